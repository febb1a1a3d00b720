"""The checks of plain numbers that settings and solver arguments share, so that every refusal
of a count or a rate reads the same way: ``max_iter must be an int ≥ 0, got -3``."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["check_int", "check_number"]


def check_int(name: str, value, least: Optional[int] = None) -> int:
    """``value`` as a Python ``int``, or ``ValueError`` naming ``name``, what it must be and what it was.

    A ``bool`` is refused (``True`` is not a count); numpy integers are accepted. With ``least``,
    values below it are refused too.

    Example:
      >>> check_int("steps", np.int64(3), least=1)
      3
      >>> check_int("steps", 0, least=1)
      Traceback (most recent call last):
      ValueError: steps must be an int ≥ 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (least is not None and value < least):
        bound = "" if least is None else f" ≥ {least}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float = 0):
    """``value`` itself if it is a finite ``int`` or ``float`` ≥ ``low``, else ``ValueError`` naming
    ``name`` (a ``bool`` is refused, and so are numpy scalars other than ``float64``: settings
    are recorded as JSON).

    Example:
      >>> check_number("weight_decay", float("nan"))
      Traceback (most recent call last):
      ValueError: weight_decay must be a finite number ≥ 0, got nan
    """
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number ≥ {low:g}, got {value!r}")
    return value
