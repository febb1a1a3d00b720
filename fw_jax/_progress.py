"""Progress of long steps: a bar on a terminal, plain lines in a log, nothing when quiet.

Everything that can take more than a few seconds (loading a checkpoint, calibration, pruning
blocks and layers, evaluation windows, saving) reports through a :class:`Progress`:

- verbosity :data:`QUIET` (``-q``): nothing; only results and errors are printed by the caller;
- :data:`NORMAL` (the default): one bar (with rate and ETA) per step on a terminal, or, when
  stderr is not a terminal (a log file, CI), a plain line when a step finishes (and every
  ``interval`` seconds while it runs); a one-line summary per pruned block;
- :data:`VERBOSE` (``-v``): also a line per layer.

Library functions take ``progress: bool | Progress`` (``True``: NORMAL to stderr) and make it
the current one for the functions they call (:func:`use`), so deep helpers (the checkpoint
loader, the perplexity loop) report through :func:`current` without a parameter of their own;
outside any :func:`use` the current progress is quiet.

Inside :func:`interruptible` (``prune_model`` runs in it), Ctrl-C stops at the next step
boundary: :meth:`Progress.steps` and :meth:`Steps.advance` are where a pending Ctrl-C is raised
(:func:`check_interrupt`), so a run stops between layers or blocks, with no computation left
running, instead of once JAX's queued work is done.

Example:
  >>> progress = Progress(VERBOSE)
  >>> with progress.steps(3, "evaluating", unit="window") as steps:
  ...     for _ in range(3):
  ...         steps.advance()
  >>> progress.say("done")
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import signal
import sys
import threading
import time
from typing import IO, Iterator, Optional, Union

QUIET, NORMAL, VERBOSE = 0, 1, 2

__all__ = ["NORMAL", "QUIET", "VERBOSE", "Progress", "Steps", "as_progress", "check_interrupt", "current",
           "interruptible", "use"]


class Progress:
    """Where and how much to report (see the module docstring).

    Args:
      verbosity: :data:`QUIET`, :data:`NORMAL` or :data:`VERBOSE`.
      stream: where to write; ``None`` is ``sys.stderr`` at the time of writing.
      bars: draw tqdm bars (``None``: when ``stream`` is a terminal) rather than plain lines.
      interval: seconds between plain lines of a running step (the last one is always written).
    """

    def __init__(self, verbosity: int = NORMAL, stream: Optional[IO[str]] = None, bars: Optional[bool] = None,
                 interval: float = 10.0):
        self.verbosity = int(verbosity)
        self._stream = stream
        self._bars = bars
        self.interval = float(interval)
        self._open = 0  # bars drawn now: lines go through tqdm.write so they do not break them

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def bars(self) -> bool:
        if self._bars is not None:
            return self._bars
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def enabled(self, level: int = NORMAL) -> bool:
        return self.verbosity >= level

    def say(self, message: str, level: int = NORMAL) -> None:
        """Write one line if the verbosity is at least ``level``."""
        if not self.enabled(level):
            return
        if self._open:
            from tqdm import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def steps(self, total: Optional[int], desc: str, *, unit: str = "step", level: int = NORMAL,
              leave: bool = True, running_lines: bool = True) -> Iterator["Steps"]:
        """A step of ``total`` parts: ``with progress.steps(n, "evaluating") as s: ... s.advance()``.

        ``leave=False`` removes the bar when done and writes no closing line (for inner steps whose
        result the caller summarises itself, such as the layers of one block).
        ``running_lines=False`` writes only the closing line off a terminal (for steps whose
        parts print their own lines, such as the blocks of a model).
        """
        check_interrupt()  # a step boundary: a pending Ctrl-C stops here
        steps = Steps(self, total, desc, unit, level, leave and running_lines, leave)
        try:
            yield steps
        finally:
            steps.close()

    @contextlib.contextmanager
    def timed(self, desc: str, level: int = NORMAL) -> Iterator[None]:
        """A short step without parts: ``desc: done in 3.1s`` when it ends."""
        start = time.perf_counter()
        yield
        self.say(f"{desc}: done in {time.perf_counter() - start:.1f}s", level)


class Steps:
    """One running step of a :class:`Progress` (made by :meth:`Progress.steps`)."""

    def __init__(self, progress: Progress, total: Optional[int], desc: str, unit: str, level: int,
                 running_lines: bool, leave: bool):
        self.progress, self.total, self.desc, self.unit, self.leave = progress, total, desc, unit, leave
        self.running_lines = running_lines
        self.done = 0
        self.note = ""
        self._active = progress.enabled(level)
        self._start = self._last_line = time.perf_counter()
        self._bar = None
        if self._active and progress.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=progress.stream, leave=leave,
                             mininterval=0.5, **_width(progress.stream))
            progress._open += 1

    def advance(self, n: int = 1, note: Optional[str] = None) -> None:
        """Count ``n`` more parts done; ``note`` is shown beside the count (e.g. the last layer).
        Then a pending Ctrl-C (see :func:`interruptible`) is raised here, the part being done."""
        self.done += n
        if note is not None:
            self.note = note
        self._show(n, note)
        check_interrupt()

    def _show(self, n: int, note: Optional[str]) -> None:
        if not self._active:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.running_lines and now - self._last_line >= self.progress.interval and self.done != self.total:
            self._last_line = now
            self.progress.say(self._line(now), self.progress.verbosity)

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        line = f"{self.desc}: {count} {self.unit}s in {elapsed:.1f}s"
        if self.total and 0 < self.done < self.total:
            line += f", about {elapsed / self.done * (self.total - self.done):.0f}s left"
        return line + (f" ({self.note})" if self.note else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.progress._open -= 1
        elif self._active and self.leave and self.done:
            self.progress.say(self._line(time.perf_counter()), self.progress.verbosity)
        self._active = False


def _width(stream) -> dict:
    """tqdm's width options: follow the terminal's width, or 100 columns where the terminal
    reports none (a pseudo-terminal of size 0, where tqdm would draw nothing)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 100, "nrows": 24}


_QUIET = Progress(QUIET)
_CURRENT: contextvars.ContextVar[Progress] = contextvars.ContextVar("fw_jax_progress", default=_QUIET)


def as_progress(progress: Union[bool, Progress, None]) -> Progress:
    """``True`` → NORMAL to stderr, ``False``/``None`` → quiet, a :class:`Progress` → itself."""
    if isinstance(progress, Progress):
        return progress
    return Progress(NORMAL) if progress else _QUIET


def current() -> Progress:
    """The progress the innermost :func:`use` made current (quiet outside any)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(progress: Union[bool, Progress, None]) -> Iterator[Progress]:
    """Make ``progress`` (see :func:`as_progress`) the current one inside the ``with`` block."""
    token = _CURRENT.set(as_progress(progress))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


# ----------------------------------------------------------------------------- Ctrl-C at step boundaries

_interrupt = {"pending": False}  # set by interruptible()'s SIGINT handler, raised by check_interrupt()


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed inside :func:`interruptible` since the
    last check; otherwise do nothing (always, outside :func:`interruptible`)."""
    if _interrupt["pending"]:
        _interrupt["pending"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible(progress: Optional[Progress] = None) -> Iterator[None]:
    """Inside the ``with`` block, Ctrl-C stops the work at the next step boundary rather than at once.

    Python delivers Ctrl-C between bytecodes, but a JAX computation already dispatched keeps
    running: stopping at once leaves it (and all the work queued behind it) to finish before the
    process can exit. Here the first Ctrl-C only marks a stop as pending, says so on
    ``progress``' stream, and :func:`check_interrupt` raises ``KeyboardInterrupt`` at the next
    :meth:`Progress.steps` or :meth:`Steps.advance` (in ``prune_model``: when the layer being
    pruned is done), where nothing is left running. A second Ctrl-C raises at once. A Ctrl-C
    still pending when the block ends is raised there.

    Only the main thread can take signals, and a SIGINT handler set by someone else (or SIGINT
    ignored) is left alone: elsewhere this does nothing.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def on_ctrl_c(signum, frame):
        if _interrupt["pending"]:  # pressed again: the user does not want to wait
            _interrupt["pending"] = False
            raise KeyboardInterrupt
        _interrupt["pending"] = True
        _say_now(progress, "Ctrl-C: stopping when the current layer or block is done (Ctrl-C again: at once)")

    _interrupt["pending"] = False
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pending, _interrupt["pending"] = _interrupt["pending"], False
    if pending:  # pressed after the last step boundary: stop now rather than never
        raise KeyboardInterrupt


def _say_now(progress: Optional[Progress], message: str) -> None:
    """Write a line from a signal handler: straight to the file descriptor, since the handler may
    run in the middle of another write to the same buffered stream."""
    if progress is None or not progress.enabled(NORMAL):
        return
    try:
        fd = progress.stream.fileno()
        os.write(fd, (("\n" if progress.bars else "") + message + "\n").encode())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass  # a stream without a file descriptor (a test's buffer): the stop itself will say it
