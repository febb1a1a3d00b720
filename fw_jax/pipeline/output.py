"""Output folders: what fw_jax may write, replace and delete, and nothing else.

The promises (README, "What fw_jax promises"):

* fw_jax writes only inside ``OUT``, ``OUT.partial`` (the resumable checkpoints) and hidden
  temporaries ``.OUT.tmp-*`` / ``.OUT.old-*`` next to them;
* it replaces or deletes only folders it wrote, which it recognises by its marker file
  (:data:`MARKER_NAME`), and with ``overwrite`` only the files that marker lists: a folder with
  anything else in it is refused, as is the input model's own folder (or a folder holding it);
* a finished ``OUT`` is complete or absent: it is assembled in a temporary folder and renamed
  into place in one step; every later step of finishing can be killed and run again.

:func:`check_output` runs before anything is loaded or written, so a run that will be refused
is refused at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

from fw_jax._files import atomic_write, move_aside, new_folder_beside

__all__ = ["MARKER_NAME", "OutputError", "OutputPlan", "check_output", "clean_stale_temporaries",
           "new_temporary", "read_marker", "write_marker", "remove_own_folder"]

MARKER_NAME = ".fw_jax.json"  #: in every folder fw_jax writes: who wrote it, what it is, its files
FINISHED, PARTIAL, BUILDING = "pruned-model", "partial-run", "building"


class OutputError(ValueError):
    """An output folder fw_jax must not write, replace or delete. The message says why and what to do."""


def read_marker(folder: str) -> Optional[dict]:
    """The marker of a folder fw_jax wrote, or None (no marker, or not one of ours)."""
    try:
        with open(os.path.join(folder, MARKER_NAME)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "fw_jax" else None


def write_marker(folder: str, kind: str, **fields) -> None:
    """Mark ``folder`` as written by fw_jax (atomically: a reader sees the old marker or the new)."""
    atomic_write(os.path.join(folder, MARKER_NAME), json.dumps({"written_by": "fw_jax", "kind": kind, **fields}))


def _entries(folder: str) -> list[str]:
    return sorted(os.listdir(folder))


def _foreign(folder: str, marker: dict) -> list[str]:
    """Entries of ``folder`` that its marker does not list (that fw_jax did not write)."""
    own = set(marker.get("files", [])) | {MARKER_NAME}
    return [name for name in _entries(folder) if name not in own]


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """What :func:`check_output` found: where to write, and what is already there."""

    out_dir: str  #: absolute path of ``OUT``
    work_dir: str  #: ``OUT.partial``
    finished: Optional[dict]  #: the marker of a finished ``OUT``, which only ``overwrite`` replaces
    foreign: tuple  #: entries of a finished ``OUT`` that fw_jax did not write (block ``overwrite``)
    partial: Optional[dict]  #: the marker of an existing ``OUT.partial`` (its run), if any

    def check_replace(self, overwrite: bool) -> None:
        """Raise unless the run may go on to write ``OUT``: a finished ``OUT`` needs
        ``overwrite`` (``FileExistsError``), and must hold only what fw_jax wrote (``OutputError``)."""
        if self.finished is None:
            return
        if not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds a finished pruned model "
                                  f"({self.finished.get('describe', '?')}); pass --overwrite to replace it")
        if self.foreign:
            raise OutputError(
                f"{self.out_dir} was written by fw_jax but now also holds files it did not write "
                f"({_shown(list(self.foreign))}); --overwrite replaces only fw_jax's own files: move them first"
            )


def check_output(out_dir: str, model: Optional[str]) -> OutputPlan:
    """Decide, before anything is written, whether a run may write ``out_dir``.

    Refuses (``OutputError``): ``out_dir`` is the input model's file or folder, or holds it; it is
    a file; it is a non-empty folder fw_jax did not write (whatever ``overwrite`` says); an
    ``OUT.partial`` that fw_jax did not write; a place fw_jax cannot write. A finished ``OUT`` is
    reported in the plan; :meth:`OutputPlan.check_replace` says whether it may be replaced.
    """
    out = os.path.realpath(os.fspath(out_dir))
    work = out + ".partial"
    if model is not None and os.path.exists(model):
        source = os.path.realpath(model)
        if _inside(source, out):
            what = "is the input model" if source == out else f"holds the input model {source}"
            raise OutputError(f"--out {out_dir} {what}; fw_jax never writes over its input (choose another --out)")
    for path in (out, work):
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputError(f"{path} is a file, not a folder; choose another --out")
    finished, foreign = None, ()
    if os.path.isdir(out) and _entries(out):
        marker = read_marker(out)
        if marker is None:
            raise OutputError(
                f"{out} is not empty and was not written by fw_jax (it holds {_shown(_entries(out))}); "
                "fw_jax never replaces a folder it did not write, even with --overwrite: choose a new "
                "--out or an empty folder"
            )
        if marker.get("kind") == FINISHED:
            finished, foreign = marker, tuple(_foreign(out, marker))
    partial = None
    if os.path.isdir(work):
        partial = read_marker(work)
        if partial is None and os.path.isfile(os.path.join(work, "state.json")):
            partial = {"written_by": "fw_jax", "kind": PARTIAL}  # checkpoints of fw_jax ≤ 0.1, unmarked
        if partial is None and _entries(work):
            raise OutputError(
                f"{work} (where fw_jax keeps a run's checkpoints) exists and was not written by fw_jax "
                f"(it holds {_shown(_entries(work))}); move it or choose another --out"
            )
    _check_writable(out)
    return OutputPlan(out_dir=out, work_dir=work, finished=finished, foreign=foreign, partial=partial)


def _check_writable(out: str) -> None:
    """The nearest existing folder on the way to ``out``'s parent must be writable: the output
    and its checkpoints are created next to ``out`` and renamed into place."""
    place = os.path.dirname(out)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place) or not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output: {place} is not a writable folder (for --out {out})")


def clean_stale_temporaries(out_dir: str) -> list[str]:
    """Delete fw_jax's own leftovers next to ``out_dir`` from killed runs: ``.OUT.tmp-*`` folders
    (a model being assembled) and ``.OUT.old-*`` folders (one being replaced or deleted). Only
    folders that are empty or carry fw_jax's marker are removed. Returns what was removed."""
    out = os.path.realpath(out_dir)
    parent, base = os.path.dirname(out), os.path.basename(out)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if not (name.startswith(f".{base}.tmp-") or name.startswith(f".{base}.old-")):
            continue
        path = os.path.join(parent, name)
        if not os.path.isdir(path):
            continue
        inner = os.path.join(path, "x")  # an old folder moved aside: .OUT.old-*/x
        ours = read_marker(path) is not None or not os.listdir(path) or (
            os.listdir(path) == ["x"] and (read_marker(inner) is not None or not os.listdir(inner)))
        if ours:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def new_temporary(out_dir: str, kind: str = BUILDING) -> str:
    """A fresh hidden folder next to ``out_dir``, marked as fw_jax's at once so that a kill
    leaves something :func:`clean_stale_temporaries` recognises."""
    tmp = new_folder_beside(out_dir)
    write_marker(tmp, kind)
    return tmp


def remove_own_folder(folder: str) -> None:
    """Delete a folder fw_jax wrote, so that a kill at any moment leaves either the whole folder
    or a hidden ``.X.old-*`` leftover that the next run cleans: rename it aside, then delete."""
    if os.path.isdir(folder):
        shutil.rmtree(move_aside(folder), ignore_errors=True)
