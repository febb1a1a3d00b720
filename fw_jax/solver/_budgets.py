"""Sparsity budgets: which binary masks are allowed, and how a layer splits into budget units.

A *budget unit* is the part of the weight matrix that one budget constraint covers:

==================  ======================================  =====================
budget              binary set                              unit
==================  ======================================  =====================
``PerRow(k)``       each row keeps exactly ``k``             one row ``(d_in,)``
``NM(n, m)``        each block of ``m`` consecutive inputs   one row ``(d_in,)``
                    in a row keeps exactly ``n``
``LayerBudget(K)``  the whole matrix keeps exactly ``K``     the matrix
                                                            ``(d_out, d_in)``
==================  ======================================  =====================

The solver works on a stack of units ``(units, *unit_shape)``: per-row and n:m budgets give
``(d_out, d_in)`` (a row per unit, each with its own step size and stopping), the layer budget
gives ``(1, d_out, d_in)``. Naming: ``NM(n, m)`` keeps ``n`` out of every ``m`` (2:4 keeps 2);
tools that count the pruned weights instead must convert at the boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Union

__all__ = ["PerRow", "NM", "LayerBudget", "Budget", "as_budget"]


@dataclasses.dataclass(frozen=True)
class PerRow:
    """Keep exactly ``k`` weights in every output row.

    Relaxed polytope per row: ``{m : 0 ≤ m ≤ 1, Σ_j m_j ≤ k}``.
    """

    k: int

    def check(self, d_out: int, d_in: int) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool):
            raise ValueError(f"PerRow.k must be an int, got {self.k!r} ({type(self.k).__name__}).")
        if not 1 <= self.k <= d_in:
            raise ValueError(
                f"PerRow.k = {self.k} is outside 1..d_in = 1..{d_in}: the number of weights kept "
                "per row must be at least 1 and at most the row length."
            )

    def units_kept(self, d_out: int, d_in: int) -> int:
        """Weights kept per budget unit (a row)."""
        return self.k

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.k * d_out

    @property
    def is_separable(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class NM:
    """Keep exactly ``n`` weights in every block of ``m`` consecutive inputs of a row (2:4 keeps 2).

    Relaxed polytope per block: ``{m : 0 ≤ m ≤ 1, Σ_{j ∈ block} m_j ≤ n}``.
    """

    n: int
    m: int

    def check(self, d_out: int, d_in: int) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"NM.{name} must be an int, got {value!r}.")
        if self.m < 1 or self.n < 1:
            raise ValueError(f"NM({self.n}, {self.m}): n and m must be positive (n kept out of m).")
        if self.n > self.m:
            raise ValueError(
                f"NM({self.n}, {self.m}): n > m. NM(n, m) keeps n out of every m, so n ≤ m is expected."
            )
        if d_in % self.m:
            raise ValueError(
                f"NM({self.n}, {self.m}): m = {self.m} does not divide d_in = {d_in}; every row "
                "must split into whole blocks of m consecutive inputs."
            )

    def units_kept(self, d_out: int, d_in: int) -> int:
        return self.n * (d_in // self.m)

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.n * (d_in // self.m) * d_out

    @property
    def is_separable(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class LayerBudget:
    """Keep exactly ``k`` weights in the whole ``(d_out, d_in)`` matrix.

    Relaxed polytope: ``{M : 0 ≤ M ≤ 1, Σ_ij M_ij ≤ k}``. Rows are coupled only through the LMO.
    """

    k: int

    def check(self, d_out: int, d_in: int) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool):
            raise ValueError(f"LayerBudget.k must be an int, got {self.k!r}.")
        if not 1 <= self.k <= d_out * d_in:
            raise ValueError(
                f"LayerBudget.k = {self.k} is outside 1..d_out*d_in = 1..{d_out * d_in}."
            )

    def units_kept(self, d_out: int, d_in: int) -> int:
        return self.k

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.k

    @property
    def is_separable(self) -> bool:
        return False


Budget = Union[PerRow, NM, LayerBudget]


def as_budget(budget: Union[int, Budget]) -> Budget:
    """Accept a plain ``int`` as ``PerRow(k)``; pass budget objects through."""
    if isinstance(budget, (PerRow, NM, LayerBudget)):
        return budget
    if isinstance(budget, int) and not isinstance(budget, bool):
        return PerRow(budget)
    try:
        import numpy as np

        if isinstance(budget, np.integer):
            return PerRow(int(budget))
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(
        f"budget must be an int k (weights kept per row), PerRow(k), NM(n, m) or LayerBudget(k); "
        f"got {budget!r}."
    )
