"""Files and folders written so that a reader, or a run killed at any moment, sees the old
version or the whole new one. Shared by the model savers (``models``) and the pipeline's output
folders (``pipeline/output.py``), which decides *whether* a folder may be written.

* :func:`atomic_write`: one file, through a synced temporary renamed over it;
* :func:`new_folder_beside`: a hidden ``.NAME.tmp-*`` folder next to a target (same file
  system, so it can be renamed into place), with an ordinary folder's permissions;
* :func:`move_aside`: rename a folder into a hidden ``.NAME.old-*`` folder (as ``x`` inside it),
  the one step that takes it out of the way; deleting it can then be killed and redone;
* :func:`replace_folder`: put a finished temporary folder at the target in one rename, moving
  what was there aside first and deleting it after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "new_folder_beside", "move_aside", "replace_folder"]


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (``str`` as UTF-8; a callable is given the open binary file to write, so
    large contents need not sit in memory as bytes) to ``path`` so that a reader, or a run
    killed midway, sees either the old file or the whole new one: a synced temporary file
    renamed over it."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def new_folder_beside(target: str | os.PathLike) -> str:
    """A fresh, empty ``.NAME.tmp-*`` folder in ``target``'s parent (created if needed)."""
    target = os.path.realpath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    return tmp


def move_aside(folder: str | os.PathLike) -> str:
    """Rename ``folder`` to ``.NAME.old-*/x`` beside it; returns the ``.NAME.old-*`` folder.
    When the rename fails (a mount point, a read-only disk) the ``OSError`` is raised and
    nothing is left behind: ``folder`` is where it was and the ``.NAME.old-*`` folder is gone."""
    folder = os.path.realpath(os.fspath(folder))
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=os.path.dirname(folder))
    try:
        os.rename(folder, os.path.join(aside, "x"))
    except BaseException:
        _remove_empty(aside)
        raise
    return aside


def replace_folder(tmp: str, target: str | os.PathLike) -> None:
    """Rename the finished ``tmp`` to ``target``; an existing ``target`` is moved aside first
    and deleted after (the caller has decided that it may be). When a rename fails the
    ``OSError`` is raised with ``target`` as it was (put back if it had been moved aside) and
    ``tmp`` untouched, for the caller to remove."""
    target = os.path.realpath(os.fspath(target))
    aside = move_aside(target) if os.path.isdir(target) else None
    try:
        os.rename(tmp, target)
    except BaseException:
        if aside is not None:
            try:
                os.rename(os.path.join(aside, "x"), target)
                _remove_empty(aside)
            except OSError:
                pass  # left as .NAME.old-*/x, which the next run of fw_jax cleans up
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
