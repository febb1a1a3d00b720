"""Pruning across processes (hosts) on JAX's own distributed runtime, ``jax.distributed``.

Every process runs the same command. After :func:`initialize`:

* the calibration samples are split across processes (process ``p`` of ``P`` takes samples
  ``p, p + P, ...``); each runs its share through the model and accumulates its part of every
  Gram matrix, and one all-gather sums the parts (:func:`sum_over_processes`), in process order,
  so every process holds the same matrices;
* the layers of a block are shared out (layer ``i`` to process ``i mod P``); each solves its
  own, and the pruned weights and records are exchanged (:func:`share_results`), so every
  process continues with the same pruned block;
* only process 0 writes (:func:`is_writer`): checkpoints, the output folder, the report.

On a CPU the collectives go through Gloo. On a cluster ``jax.distributed.initialize()`` finds
the coordinator itself on SLURM, Open MPI and TPU pods (``--coordinator auto``).
"""

from __future__ import annotations

import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["barrier", "initialize", "is_writer", "local_samples", "process_count", "share_results",
           "sum_over_processes"]


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Join the run: ``coordinator`` ``"HOST:PORT"`` (process 0 listens there), or ``"auto"`` /
    ``None`` for ``jax.distributed``'s detection of the cluster. Call before any other JAX work."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices; no effect on GPUs/TPUs
    if coordinator in (None, "auto"):
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes files (process 0)."""
    return jax.process_index() == 0


def local_samples(tokens: np.ndarray) -> np.ndarray:
    """This process's share of the calibration samples (rows ``p, p + P, ...``)."""
    return tokens[jax.process_index()::jax.process_count()]


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _allgather(array) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(array)))


def sum_over_processes(arrays: dict) -> dict:
    """``{key: Σ_p array_p}``, summed in process order (the same bits on every process)."""
    if jax.process_count() == 1:
        return arrays
    out = {}
    for key, value in arrays.items():
        parts = _allgather(value)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        out[key] = jnp.asarray(total)
    return out


def owner(i: int) -> int:
    """The process that solves layer ``i`` of a block."""
    return i % jax.process_count()


def share_results(results: dict, shapes: list) -> list:
    """Every layer's ``(new_weight, record)`` on every process, from ``results`` (``{i: ...}``,
    this process's layers) and the layers' weight shapes."""
    if jax.process_count() == 1:
        return [results[i] for i in range(len(shapes))]
    shared = []
    for i, shape in enumerate(shapes):
        mine = owner(i) == jax.process_index()
        weight = np.asarray(results[i][0], np.float32) if mine else np.zeros(shape, np.float32)
        weight = _allgather(weight)[owner(i)]
        raw = json.dumps(results[i][1]).encode() if mine else b""
        length = int(_allgather(np.array([len(raw)], np.int64))[:, 0].max())
        buffer = np.zeros(length, np.uint8)
        buffer[:len(raw)] = np.frombuffer(raw, np.uint8)
        record = json.loads(_allgather(buffer)[owner(i)].tobytes().decode())
        shared.append((jnp.asarray(weight), record))
    return shared
