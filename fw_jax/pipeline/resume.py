"""Resuming an interrupted prune run from its checkpoints (``work_dir``, usually ``OUT.partial``).

:func:`open_run` reads what an earlier run of the same run record left (refusing another run's
folder), checks every finished block's checksums and records this run's ``state.json``;
:func:`replay` runs the finished blocks again, each with its saved pruned weights, to recompute
the next block's inputs. Running a block is deterministic, so a resumed run gives the model an
uninterrupted one gives, bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

from fw_jax import _progress, models
from fw_jax._files import atomic_write

from . import distributed
from .checkpoints import (Damage, block_file, discard_blocks, finished_blocks, load_block_history, load_block_records,
                          verified_blocks)
from .identity import digest

__all__ = ["Resumed", "open_run", "replay"]


class Resumed(NamedTuple):
    """What an earlier run of the same run finished: the first block left to prune, and the
    layer records, wall time and Frank-Wolfe history of the blocks before it."""

    start: int = 0
    records: tuple = ()
    seconds: float = 0.0
    history: Optional[dict] = None


def _not_used(damage, work_dir: str, b: int, progress: _progress.Progress) -> None:
    """Block ``b``'s checkpoint failed its check (``damage``): discard it and every later block's
    (computed from it), so that they are pruned again, and say so naming the file."""
    distributed.barrier("damaged checkpoint found")  # every process has read what it needs
    later = discard_blocks(work_dir, b) if distributed.is_writer() else 0
    also = f", with the checkpoints of the {later} later blocks (computed from it)," if later else ""
    progress.say(f"warning: {damage}. It is not used: this checkpoint{also} was discarded, and block {b} "
                 "and every later block are pruned again")


def _earlier(work_dir: str, start: int) -> Resumed:
    """The records, time and history of the first ``start`` saved blocks."""
    records, seconds, history = [], 0.0, None
    for b in range(start):
        block_records, block_seconds = load_block_records(work_dir, b)
        records += block_records
        seconds += block_seconds
        history = load_block_history(work_dir, b) or history
    return Resumed(start, tuple(records), seconds, history)


def open_run(work_dir: str, record: dict, describe: str, count: int, progress: _progress.Progress) -> Resumed:
    """Open ``work_dir`` for the run ``record`` of ``count`` blocks: what an earlier run of it
    finished and may be used (a damaged block is discarded with every later one, and named), and
    this run's ``state.json`` and marker written (by the writer process). Raises
    :class:`~fw_jax.pipeline.identity.ResumeMismatch` if it holds another run."""
    from .output import PARTIAL, read_marker, write_marker

    start, damage = 0, None
    if os.path.isdir(work_dir):
        start = finished_blocks(work_dir, record)  # checked before anything is written
        start, damage = verified_blocks(work_dir, start)  # a damaged block is pruned again
    distributed.barrier("checkpoints read")  # nobody reads a state.json being replaced
    if distributed.is_writer():
        os.makedirs(work_dir, exist_ok=True)
        if read_marker(work_dir) is None:
            write_marker(work_dir, PARTIAL, describe=describe)
        atomic_write(os.path.join(work_dir, "state.json"),
                     json.dumps({"fingerprint": digest(record), "describe": describe, "blocks": count,
                                 "run": record}, default=str))
    if damage is not None:
        _not_used(damage, work_dir, start, progress)
    if start:
        progress.say(f"resuming after block {start - 1} from {work_dir}")
    return _earlier(work_dir, start)


def replay(blocks, work_dir: str, resumed: Resumed, hidden, recovery, progress: _progress.Progress):
    """Run the finished blocks again, each with its saved pruned weights (and, with recovery, its
    dense weights first for the dense stream): ``(hidden, resumed)``, the inputs of the first
    block left and what was resumed (less, if a saved shard turned out unusable)."""
    if not resumed.start:
        return hidden, resumed
    with progress.steps(resumed.start, "replaying the finished blocks", unit="block") as steps:
        for b in range(resumed.start):
            path = block_file(work_dir, b)
            try:  # its checksum matched: this can only fail if fw_jax wrote a bad block
                shard = blocks.read_shard(b, path)
            except models.CheckpointError as e:
                _not_used(Damage(path, f"fw_jax's checkpoint of block {b} of this run (not the input model) "
                                       f"cannot be used: {e.problem}"), work_dir, b, progress)
                return hidden, _earlier(work_dir, b)
            if recovery is not None:  # the dense block first, as the original checkpoint has it
                with blocks.resident(b):
                    recovery.replay(b)
            with blocks.resident(b, shard):
                del shard
                hidden = blocks.run(b, hidden)
            steps.advance()
    return hidden, resumed
