"""Output folders: what fw_jax may write, replace and delete, and nothing else.

The promises (README, "What fw_jax promises"):

* fw_jax writes only inside ``OUT``, ``OUT.partial`` (the resumable checkpoints) and hidden
  temporaries ``.OUT.tmp-*`` / ``.OUT.old-*`` next to them;
* it replaces or deletes only folders it wrote, which it recognises by its marker file
  (:data:`MARKER_NAME`), and with ``overwrite`` only the files that marker lists: a folder with
  anything else in it is refused, as is the input model's own folder (or a folder holding it);
* a finished ``OUT`` is complete or absent: it is assembled in a temporary folder and renamed
  into place in one step; every later step of finishing can be killed and run again. So ``OUT``
  and ``OUT.partial`` cannot be mount points (a mount point cannot be renamed): such an ``--out``
  is refused, and the message suggests a folder inside it;
* one run at a time writes an ``OUT``: :func:`lock_output` holds a lock on a hidden
  ``.OUT.lock`` beside it (``flock``, which the kernel releases when the process dies, so the
  file a killed run leaves behind blocks nobody) and removes it when the run ends.

:func:`check_output` runs before anything is loaded or written, and :func:`lock_output` right
after it, so a run that will be refused is refused at once.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import tempfile
from typing import Optional

from fw_jax._files import atomic_write, move_aside, new_folder_beside

__all__ = ["MARKER_NAME", "OutputBusy", "OutputError", "OutputLock", "OutputPlan", "check_output",
           "clean_stale_temporaries", "lock_output", "new_temporary", "read_marker", "write_marker",
           "remove_own_folder"]

MARKER_NAME = ".fw_jax.json"  #: in every folder fw_jax writes: who wrote it, what it is, its files
FINISHED, PARTIAL, BUILDING = "pruned-model", "partial-run", "building"


class OutputError(ValueError):
    """An output folder fw_jax must not write, replace or delete. The message says why and what to do."""


class OutputBusy(OutputError):
    """Another fw_jax process is writing the same ``OUT`` (it holds the lock of :func:`lock_output`)."""


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
    ``OUT.partial`` that fw_jax did not write; ``OUT`` or ``OUT.partial`` is a mount point (it
    could not be renamed into place or aside); a place fw_jax cannot write. A finished ``OUT`` is
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
    if _is_mount_point(out):
        raise OutputError(
            f"--out {out_dir} is a mount point; fw_jax publishes a finished model by renaming a folder into "
            f"place (and an earlier one aside), which cannot be done to a mount point: choose a folder inside "
            f"it, e.g. --out {os.path.join(out_dir, 'model')}"
        )
    if _is_mount_point(work):
        raise OutputError(
            f"{work} (where fw_jax keeps a run's checkpoints) is a mount point; fw_jax removes that folder by "
            "renaming it aside, which cannot be done to a mount point: choose another --out"
        )
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


def _is_mount_point(path: str) -> bool:
    """Whether ``path`` is a mount point: :func:`os.path.ismount`, or (on Linux, for bind mounts
    of a folder of the same file system, which that misses) listed in ``/proc/self/mountinfo``."""
    if not os.path.isdir(path):
        return False
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:  # the 5th field is the mount point, with space, tab, newline and \ as octal escapes
            point = fields[4]
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            if point == path:
                return True
    return False


def _check_writable(out: str) -> None:
    """The nearest existing folder on the way to ``out``'s parent must be writable: the output
    and its checkpoints are created next to ``out`` and renamed into place."""
    place = os.path.dirname(out)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place) or not os.access(place, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output: {place} is not a writable folder (for --out {out})")


def _cannot_write(out: str, place: str, error: OSError) -> OutputError:
    reason = error.strerror or str(error)
    if error.errno == errno.EROFS:
        reason += " (a read-only mount)"
    return OutputError(f"cannot write the output: fw_jax creates and renames folders in {place} (for --out {out}), "
                       f"and there it got: {reason}; choose an --out on a writable disk")


class OutputLock:
    """The lock one run holds on its ``OUT`` (from :func:`lock_output`); :meth:`release` it (or use
    it as a context manager) when the run ends, however it ends."""

    def __init__(self, path: str, fd: int, created: list[str]):
        self.path, self._fd, self._created = path, fd, created

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (so whoever takes it next finds the file
        gone and makes a new one), and remove the folders made for it if nothing else came in them."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        _remove_empty(self._created)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_name(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")


def lock_output(plan: OutputPlan) -> OutputLock:
    """Claim ``plan.out_dir`` for this run, before anything is loaded: take an exclusive lock on
    ``.OUT.lock`` beside it (creating ``OUT``'s parent folders if needed), then check that this
    place lets fw_jax create and rename folders as it will to publish (a hidden ``.OUT.tmp-*``
    folder, made and renamed, then removed).

    Raises :class:`OutputBusy` when another process holds the lock (its message names that
    process's id), :class:`OutputError` when the place cannot be written (naming it and why).
    In a run of several processes only the one that writes (process 0) takes the lock. On a file
    system that has no locks the file is still made and removed, but guards nothing."""
    out = plan.out_dir
    parent = os.path.dirname(out)
    created = []
    place = parent
    while not os.path.isdir(place):
        created.append(place)
        place = os.path.dirname(place)
    path = _lock_name(out)
    fd, held = None, False
    try:
        os.makedirs(parent, exist_ok=True)
        for _ in range(10):  # the lock file of a run that just ended may vanish under us: take the new one
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                raise OutputBusy(
                    f"another fw-jax process (pid {holder}) is writing {out}: wait for it to end, or choose "
                    f"another --out (its lock is {path})"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                held = True  # a file system without locks (some network ones): the run goes on unguarded
                break
            try:
                held = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                held = False
            if held:
                break
            os.close(fd)
            fd = None
        else:
            raise OutputBusy(f"could not take the lock {path} on {out}: it kept being replaced; try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _probe_renames(out)
    except BaseException as e:
        if held:  # ours: the file goes, with the folders made for it
            OutputLock(path, fd, created).release()
        else:  # another process's lock, or none taken: its file stays
            if fd is not None:
                os.close(fd)
            _remove_empty(created)
        if isinstance(e, OSError):
            raise _cannot_write(out, parent, e) from e
        raise
    return OutputLock(path, fd, created)


def _remove_empty(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def _probe_renames(out: str) -> None:
    """Make a hidden ``.OUT.tmp-*`` folder beside ``out``, rename it, remove it: what publishing
    does, tried before the work rather than found impossible after it."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    made = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    renamed = made + "-renamed"
    try:
        os.rename(made, renamed)
        made = renamed
    finally:
        try:
            os.rmdir(made)
        except OSError:
            pass  # an empty .OUT.tmp-* folder, which the next run's clean_stale_temporaries removes


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
    or a hidden ``.X.old-*`` leftover that the next run cleans: rename it aside, then delete.
    Raises :class:`OutputError`, naming the folder, when it cannot be renamed aside (it is then
    left as it was)."""
    if os.path.isdir(folder):
        try:
            aside = move_aside(folder)
        except OSError as e:
            raise OutputError(f"cannot remove {folder}, which fw_jax wrote: renaming it aside failed "
                              f"({e.strerror or e}); remove it yourself") from e
        shutil.rmtree(aside, ignore_errors=True)
