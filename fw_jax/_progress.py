"""How long jobs tell the user how they are going: one place, one verbosity.

Verbosity (set by the command line's ``-q`` / ``-v``, or :func:`verbosity` from Python):

* 0, quiet: nothing but results and errors;
* 1, the default: a progress bar (tqdm: count, rate, ETA) for every step that can take more
  than a few seconds (loading, calibration, pruning blocks, evaluation windows, saving) and a
  one-line summary per pruned block;
* 2, verbose: a line per pruned layer as well.

On a terminal the bars redraw in place. When stderr is not a terminal (a log file, CI), a bar
becomes a few plain lines instead (every ``max(1, total // 10)`` steps, and the last), so logs
stay readable and still say how far the job is and how long the rest will take.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, Optional

__all__ = ["verbosity", "level", "bar", "say"]

_LEVEL = [1]


def level() -> int:
    """The current verbosity (0 quiet, 1 default, 2 verbose)."""
    return _LEVEL[-1]


@contextlib.contextmanager
def verbosity(value: int) -> Iterator[None]:
    """Within the block, report at this verbosity."""
    _LEVEL.append(int(value))
    try:
        yield
    finally:
        _LEVEL.pop()


def say(message: str, at: int = 1) -> None:
    """Print ``message`` on stderr if the verbosity is at least ``at`` (above any bar)."""
    if level() >= at:
        if _ACTIVE:
            _ACTIVE[-1].write(message)
        else:
            print(message, file=sys.stderr, flush=True)


_ACTIVE: list = []


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Lines:
    """A bar for streams that are not terminals: a line every tenth of the way."""

    def __init__(self, total: Optional[int], desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.start, self.postfix = 0, time.perf_counter(), ""
        self.every = max(1, (total or 10) // 10)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or (self.total is not None and self.n >= self.total):
            elapsed = time.perf_counter() - self.start
            if self.total:
                eta = elapsed / self.n * (self.total - self.n)
                where = f"{self.n}/{self.total} {self.unit}s ({self.n / self.total:.0%}), {elapsed:.0f}s, ETA {eta:.0f}s"
            else:
                where = f"{self.n} {self.unit}s, {elapsed:.0f}s"
            print(f"{self.desc}: {where}{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = f" ({text})" if text else ""

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def bar(total: Optional[int], desc: str, unit: str = "step", *, at: int = 1) -> Iterator:
    """A progress bar over ``total`` steps (``update()`` after each), shown at verbosity ≥ ``at``.

    Example:
      >>> with bar(len(blocks), "pruning", "block") as progress:
      ...     for block in blocks:
      ...         ...
      ...         progress.update()
    """
    if level() < at:
        handle = _Silent()
    elif _is_terminal():
        from tqdm.auto import tqdm

        handle = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
        handle.write = lambda message, _t=tqdm: _t.write(message, file=sys.stderr)  # above the bar
    else:
        handle = _Lines(total, desc, unit)
    _ACTIVE.append(handle)
    try:
        yield handle
    finally:
        _ACTIVE.remove(handle)
        handle.close()


def iterate(items: Iterable, total: Optional[int], desc: str, unit: str = "step", *, at: int = 1) -> Iterator:
    """``for x in iterate(items, n, "loading", "tensor")``: :func:`bar` around a loop."""
    with bar(total, desc, unit, at=at) as progress:
        for item in items:
            yield item
            progress.update()
