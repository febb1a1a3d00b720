"""Checkpoints of a prune run in ``OUT.partial`` (or any ``work_dir``).

A run is identified by its run record and digest (``identity.py``), kept in ``state.json``; a
folder holding another run, or one of another record version, is refused
(:func:`finished_blocks`). Block ``b`` is finished when both its files exist, each written
atomically: ``block_000b.safetensors`` (the block's shard of the output, in the output dtype,
which the finished folder links in) and ``block_000b.json`` (its layer records, wall time, and
the size and SHA-256 of the shard, with a SHA-256 of the record itself; a record without them,
an older fw_jax's, cannot be verified, so its block is pruned again).

Nothing here is trusted because fw_jax wrote it: before a finished block is used again
(:func:`block_problem`) its record must parse and match its own checksum and its shard must be
byte for byte the file that was written. A block that fails is pruned again, with every later
block (their checkpoints were computed from it): :func:`discard_blocks`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import NamedTuple, Optional

from fw_jax import models
from fw_jax._files import atomic_write
from fw_jax.pipeline.identity import ResumeMismatch, check_same_run

__all__ = ["ResumeMismatch", "block_file", "block_problem", "blocks_on_disk", "check_assembled", "discard_blocks",
           "file_sha256", "finished_blocks", "load_block_records", "records_file", "save_block", "verified_blocks"]


def block_file(work_dir: str, b: int) -> str:
    return os.path.join(work_dir, f"block_{b:04d}.safetensors")


def records_file(work_dir: str, b: int) -> str:
    return os.path.join(work_dir, f"block_{b:04d}.json")


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Damage(NamedTuple):
    """Why a checkpoint file of fw_jax's cannot be used: ``str()`` is ``"PATH: problem"``."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _record_sha256(saved: dict) -> str:
    """The checksum a block record carries of itself: every field but the checksum, canonical."""
    return hashlib.sha256(json.dumps({k: v for k, v in saved.items() if k != "sha256"}, sort_keys=True)
                          .encode()).hexdigest()


def save_block(work_dir: str, b: int, blocks, records: list[dict], seconds: float,
               history: Optional[dict] = None) -> None:
    """Checkpoint block ``b`` (in memory): its shard of the output, then its records with the
    shard's size and SHA-256, each written atomically; the records file marks the block as finished."""
    shard = block_file(work_dir, b)
    blocks.write_shard(b, shard)
    saved = {"seconds": seconds, "layers": records,
             "shard": {"file": os.path.basename(shard), "bytes": os.path.getsize(shard), "sha256": file_sha256(shard)}}
    if history is not None:  # the Frank-Wolfe history of a layer of this block, for the plot
        saved["history"] = history
    saved["sha256"] = _record_sha256(saved)
    atomic_write(records_file(work_dir, b), json.dumps(saved))


def _read_records(work_dir: str, b: int) -> tuple[Optional[dict], Optional[Damage]]:
    """Block ``b``'s record, or why it cannot be used."""
    path = records_file(work_dir, b)
    whose = f"fw_jax's record of block {b} of this run (not the input model)"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, Damage(path, f"{whose} cannot be read ({e.strerror or e})")
    try:
        saved = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, Damage(path, f"{whose} is not valid JSON: it was cut short or overwritten (the parser "
                      f"stopped at line {e.lineno} column {e.colno}: {e.msg})")
    except ValueError:  # not UTF-8
        return None, Damage(path, f"{whose} is not valid JSON: it was overwritten")
    if not isinstance(saved, dict):
        return None, Damage(path, f"{whose} is not a JSON object: it was overwritten")
    shard = saved.get("shard")
    if not (isinstance(shard, dict) and isinstance(shard.get("sha256"), str) and isinstance(saved.get("sha256"), str)):
        return None, Damage(path, f"{whose} holds no checksum of its shard (an fw_jax older than checkpoint "
                      "checksums wrote it, or it was damaged), so the shard cannot be verified")
    if saved["sha256"] != _record_sha256(saved):
        return None, Damage(path, f"{whose} does not match its own SHA-256: it was changed or damaged on disk")
    seconds, layers = saved.get("seconds"), saved.get("layers")
    if not (isinstance(layers, list) and all(isinstance(r, dict) for r in layers)
            and isinstance(seconds, (int, float)) and math.isfinite(seconds)
            and isinstance(shard.get("bytes"), int)):
        return None, Damage(path, f"{whose} lacks its layer records, time or shard size")
    return saved, None


def block_problem(work_dir: str, b: int) -> Optional[Damage]:
    """Why block ``b``'s checkpoint in ``work_dir`` must not be used (the file, and a sentence
    saying it is fw_jax's checkpoint and what is wrong), or ``None``: its record parses and
    matches its own checksum, and its shard is byte for byte the file whose size and SHA-256 it
    recorded."""
    saved, damage = _read_records(work_dir, b)
    if damage is not None:
        return damage
    path = block_file(work_dir, b)
    whose = f"fw_jax's checkpoint of block {b} of this run (not the input model)"
    try:
        size = os.path.getsize(path)
        found = file_sha256(path) if size == saved["shard"]["bytes"] else None
    except OSError as e:
        return Damage(path, f"{whose} cannot be read ({e.strerror or e})")
    if found != saved["shard"]["sha256"]:
        return Damage(path, f"{whose} is not the file it wrote: its {'SHA-256' if found else 'size'} differs "
                            f"from the one recorded in {os.path.basename(records_file(work_dir, b))}, so it "
                            "was changed or damaged on disk")
    return None


def load_block_records(work_dir: str, b: int) -> tuple[list[dict], float]:
    """A saved block's layer records and wall time (:func:`block_problem` checks them first)."""
    saved, damage = _read_records(work_dir, b)
    if damage is not None:
        raise models.CheckpointError(*damage)
    return saved["layers"], float(saved["seconds"])


def load_block_history(work_dir: str, b: int) -> Optional[dict]:
    """The Frank-Wolfe history a saved block holds (of the layer plotted), or ``None``."""
    saved, damage = _read_records(work_dir, b)
    if damage is not None:
        raise models.CheckpointError(*damage)
    history = saved.get("history")
    return history if isinstance(history, dict) else None


def verified_blocks(work_dir: str, found: int) -> tuple[int, Optional[Damage]]:
    """Of the ``found`` leading finished blocks, how many may be used: those before the first
    that fails :func:`block_problem`, and what is wrong with that one (``None`` when all pass)."""
    for b in range(found):
        damage = block_problem(work_dir, b)
        if damage is not None:
            return b, damage
    return found, None


_BLOCK_FILE = re.compile(r"block_(\d{4,})\.(safetensors|json)\Z")


def discard_blocks(work_dir: str, first: int) -> int:
    """Delete the checkpoints of block ``first`` and every later block (fw_jax's own files in
    ``work_dir``), records first so that a kill midway leaves no block looking finished; returns
    how many later blocks' checkpoints (after ``first``) there were."""
    found = {}
    for name in os.listdir(work_dir):
        match = _BLOCK_FILE.match(name)
        if match and int(match.group(1)) >= first:
            found.setdefault(int(match.group(1)), []).append(name)
    for b in sorted(found):
        for name in sorted(found[b], key=lambda n: not n.endswith(".json")):
            os.remove(os.path.join(work_dir, name))
    return len([b for b in found if b > first])


def check_assembled(loaded, folder: str, work_dir: str) -> None:
    """Check a Hugging Face folder assembled from the checkpoints of ``work_dir`` before it is
    published: every tensor its index lists is there, with its shape and dtype
    (:func:`fw_jax.models._shards.check_sharded_folder`), and every block's shard is byte for
    byte the checkpoint whose SHA-256 was recorded when it was written.

    Raises:
      CheckpointError: naming the file. When a block's checkpoint itself no longer matches its
        record, it and every later block's checkpoint are discarded (the same command prunes them
        again) and the message says so.
    """
    from fw_jax.models._shards import block_shard_name, check_sharded_folder, shard_count

    check_sharded_folder(loaded, folder)
    shards = shard_count(loaded)
    for b in range(models.num_blocks(loaded.model)):
        saved, damage = _read_records(work_dir, b)
        linked = os.path.join(folder, block_shard_name(b, shards))
        try:
            if damage is None and file_sha256(linked) == saved["shard"]["sha256"]:
                continue
        except OSError as e:
            raise models.CheckpointError(linked, f"cannot be read back ({e.strerror or e}); nothing was published: "
                                                 "run the same command again") from e
        damage = damage or block_problem(work_dir, b)
        if damage is None:  # the checkpoint is whole: its copy in the folder is not
            raise models.CheckpointError(linked, f"the copy of {block_file(work_dir, b)} differs from it; "
                                                 "nothing was published: run the same command again")
        later = discard_blocks(work_dir, b)
        also = f", with the checkpoints of the {later} later blocks (computed from it)," if later else ""
        raise models.CheckpointError(damage.path, f"{damage.problem}. Nothing was published; this checkpoint{also} "
                                                  "was discarded: run the same command again to prune it again")


def finished_blocks(work_dir: str, record: dict) -> int:
    """Number of leading blocks already pruned in ``work_dir`` (0 if none) by the run ``record``
    describes, before their checksums are checked (:func:`verified_blocks`); raises
    :class:`ResumeMismatch`, saying what differs, if it holds another run or one of another
    record version (:func:`~fw_jax.pipeline.identity.check_same_run`), or naming ``state.json``
    if fw_jax's record of the run cannot be read."""
    state = os.path.join(work_dir, "state.json")
    if not os.path.exists(state):
        return 0
    try:
        with open(state, "rb") as f:
            saved = json.loads(f.read())
        problem = None if isinstance(saved, dict) else "it is not a JSON object"
    except json.JSONDecodeError as e:
        problem = f"it is not valid JSON: cut short or overwritten (line {e.lineno} column {e.colno}: {e.msg})"
    except ValueError:
        problem = "it is not valid JSON: overwritten"
    except OSError as e:
        problem = f"it cannot be read ({e.strerror or e})"
    if problem is not None:
        raise ResumeMismatch(
            f"{state}: fw_jax's record of the unfinished run in {work_dir} is damaged ({problem}), so its "
            "checkpoints cannot be checked to belong to this run and are not used. Pass --overwrite "
            "(overwrite=True) to discard them and start over.")
    check_same_run(saved, record, work_dir)
    return blocks_on_disk(work_dir)


def blocks_on_disk(work_dir: str, done: int = 0) -> int:
    """Leading blocks whose checkpoint (shard and records) is complete in ``work_dir``."""
    while all(os.path.exists(p) for p in (block_file(work_dir, done), records_file(work_dir, done))):
        done += 1
    return done
