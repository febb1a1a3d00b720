"""Errors raised when a checkpoint cannot be read or does not fit the model."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete, or does not match the model.

    The message always names the file and what was wrong with it.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but describes an architecture fw_jax has no model for."""


def config_problem(error: Exception) -> str:
    """The reason of a config validation error on one line (transformers puts it on the last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class BrokenInstallError(ImportError):
    """An installed package fw_jax relies on fails to import (for example a transformers release
    that does not support the version of one of its own dependencies that pip left installed).
    The message names the package, the installed versions and the fix; the user's files are not
    at fault."""


class CheckpointNote(UserWarning):
    """Something about a checkpoint the user should know, though it was loaded as asked: e.g. a
    config that says the head is tied over a checkpoint that stores its own, kept and used."""
