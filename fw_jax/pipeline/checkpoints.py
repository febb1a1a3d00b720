"""Checkpoints of a prune run in ``OUT.partial`` (or any ``work_dir``), and what makes two runs
the same run.

A run is identified by :func:`run_record` (model, settings, calibration and the digest of its
very tokens, the dtype it is written in, the checkpoint format) and its :func:`digest`, kept in
``state.json``. Block ``b`` is finished when both its files exist, each written atomically:
``block_000b.safetensors`` (the block's shard of the output, in the output dtype, which the
finished folder links in) and ``block_000b.json`` (its layer records and wall time).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from fw_jax import models
from fw_jax._files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "ResumeMismatch", "block_file", "blocks_on_disk", "digest", "finished_blocks",
           "load_block_records", "run_fingerprint", "run_record", "save_block"]


def run_record(loaded, settings, calibration: dict, tokens: np.ndarray) -> dict:
    """What makes two runs the same run: model, settings, calibration and its very tokens."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    return {
        "source": str(loaded.source),
        "calibration": calibration,
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "settings": settings.record(),
        "dtype": loaded.dtype,
        "checkpoint_format": CHECKPOINT_FORMAT,
    }


#: 2: a block's checkpoint is its shard of the output, ``block_0003.safetensors``, in the output
#: dtype (1, before: the pruned float32 weights in ``block_0003.npz``, which cannot be resumed).
CHECKPOINT_FORMAT = 2


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(loaded, settings, calibration: dict, tokens: np.ndarray) -> str:
    """A digest of the run (model, settings, calibration and the digest of its tokens): equal iff
    a checkpointed run can be resumed by this one."""
    return digest(run_record(loaded, settings, calibration, tokens))


def differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: X there, Y now`` for every leaf that differs between two run records."""
    out = []
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key, "(absent)"), now.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "tokens_sha256":
                out.append("calibration tokens: different (same source, but its text or tokenizer changed)")
            else:
                out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


class ResumeMismatch(ValueError):
    """A checkpoint folder holds a different run than the one asked for; nothing was written."""


def block_file(work_dir: str, b: int) -> str:
    return os.path.join(work_dir, f"block_{b:04d}.safetensors")


def save_block(work_dir: str, b: int, loaded, records: list[dict], seconds: float) -> None:
    """Checkpoint block ``b`` (in memory): its shard of the output, then its records, each written
    atomically; the records file marks the block as finished."""
    models.write_block_shard(loaded, b, block_file(work_dir, b))
    atomic_write(os.path.join(work_dir, f"block_{b:04d}.json"), json.dumps({"seconds": seconds, "layers": records}))


def load_block_records(work_dir: str, b: int) -> tuple[list[dict], float]:
    """A saved block's layer records and wall time."""
    with open(os.path.join(work_dir, f"block_{b:04d}.json")) as f:
        saved = json.load(f)
    return saved["layers"], float(saved["seconds"])


def finished_blocks(work_dir: str, record: dict) -> int:
    """Number of leading blocks already pruned in ``work_dir`` (0 if none) by the run ``record``
    describes; raises :class:`ResumeMismatch`, saying what differs, if it holds another run."""
    state = os.path.join(work_dir, "state.json")
    if not os.path.exists(state):
        return 0
    with open(state) as f:
        saved = json.load(f)
    if saved.get("fingerprint") != digest(record):
        then = saved.get("run")
        differs = differences(then, json.loads(json.dumps(record, default=str))) if isinstance(then, dict) else [
            "it was written by an older fw_jax, which did not record its settings"]
        raise ResumeMismatch(
            f"{work_dir} holds an unfinished run of another model, settings or calibration "
            f"({saved.get('describe', '?')}), so it cannot be resumed by this one:\n  - "
            + "\n  - ".join(differs or ["(the run records differ)"])
            + "\nRun the earlier command to resume it, or pass --overwrite (overwrite=True) to discard it and start over."
        )
    return blocks_on_disk(work_dir)


def blocks_on_disk(work_dir: str, done: int = 0) -> int:
    """Leading blocks whose checkpoint (shard and records) is complete in ``work_dir``."""
    while all(os.path.exists(p) for p in (block_file(work_dir, done), os.path.join(work_dir, f"block_{done:04d}.json"))):
        done += 1
    return done
