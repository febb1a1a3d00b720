"""Sparsity budgets: which binary masks are allowed, and everything the solver needs to know
about them.

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

The solver works on a stack of units ``(units, *unit_shape)`` (:meth:`Budget.units`): per-row
and n:m budgets give ``(d_out, d_in)`` (a row per unit, each with its own step size and
stopping), the layer budget gives ``(1, d_out, d_in)``. Naming: ``NM(n, m)`` keeps ``n`` out of
every ``m`` (2:4 keeps 2); tools that count the pruned weights instead convert at the boundary.

Each budget carries its own behaviour (single dispatch on the budget object, no type switches
elsewhere): its shape check, its unit stack, how many entries ``α`` fixes, its linear
minimization oracle, its rounding, its mask check and its 1-swap refinement. A new budget is a
subclass of :class:`Budget` implementing these methods (see ``docs/design.md`` §23, "Where to add").
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fw_jax._checks import check_int
from fw_jax.solver._lmo import NMLMO, TopKLMO
from fw_jax.solver._select import group_ranks, lexicographic_better, top_count_units
from fw_jax.solver._swaps import SwapResult, refine_blocks, refine_rows, refine_whole

__all__ = ["Budget", "PerRow", "NM", "LayerBudget", "as_budget", "round_to_budget", "swap_refine"]


def _bool_keys(keys) -> tuple[Array, ...]:
    keys = tuple(jnp.asarray(k) for k in keys)
    return tuple(k.astype(jnp.int32) if k.dtype == jnp.bool_ else k for k in keys)


class Budget(abc.ABC):
    """What a sparsity budget must say about itself (the solver asks nothing else).

    Attributes:
      per_unit: weights kept per counting group: per row (``PerRow``), per block of ``m``
        (``NM``) or per layer (``LayerBudget``). ``α`` fixes ``⌊α·per_unit⌋`` of them.
      pattern: ``(n, m)`` for an n:m structure (SparseGPT prunes such budgets group by group),
        else ``None``.
      separable_rows: every unit lies inside one row, so rows can be solved apart (in chunks,
        bounding the solve's memory; ``SolverOptions.row_chunk``).
    """

    pattern = None  # (n, m) for n:m budgets
    separable_rows = False

    @property
    @abc.abstractmethod
    def per_unit(self) -> int: ...

    @abc.abstractmethod
    def check(self, d_out: int, d_in: int) -> None:
        """Raise ``ValueError`` unless the budget fits a ``(d_out, d_in)`` layer."""

    @abc.abstractmethod
    def total_kept(self, d_out: int, d_in: int) -> int:
        """Weights kept in the whole layer."""

    def units(self, x: Array) -> Array:
        """``(d_out, d_in)`` → the stack of budget units ``(units, *unit_shape)``."""
        return x

    def from_units(self, x: Array) -> Array:
        """Inverse of :meth:`units`."""
        return x

    def unit_totals(self, row_values: Array) -> Array:
        """Per-row values (e.g. errors) summed per unit: ``(d_out,)`` → ``(units,)``."""
        return row_values

    def rows_of_units(self, unit_values: Array) -> Array:
        """Per-unit values spread back over rows: ``(units,)`` → ``(d_out,)`` (or broadcastable)."""
        return unit_values

    def fixed_count(self, alpha: Array) -> Array:
        """Entries ``α`` fixes per counting group, ``⌊α·per_unit⌋`` (traced ``alpha``)."""
        return jnp.floor(alpha * self.per_unit + 1e-9).astype(jnp.int32)

    @abc.abstractmethod
    def oracle(self, method: str = "search"):
        """The linear minimization oracle of one unit's relaxed polytope (``_lmo.py``);
        ``method`` chooses the threshold search of top-k oracles."""

    @abc.abstractmethod
    def round(self, keys: tuple[Array, ...], count: Optional[Array] = None) -> Array:
        """Binary ``(d_out, d_in)`` mask keeping, in every counting group, the entries that rank
        first under the lexicographic order of ``keys`` (larger first, first key most
        important; remaining ties to the lower index). ``count`` overrides the number kept per
        group (may be traced)."""

    @abc.abstractmethod
    def check_mask(self, kept: np.ndarray, what: str = "mask") -> None:
        """Raise ``ValueError`` unless the concrete boolean ``kept`` meets the budget exactly,
        naming the first row (and block) that does not."""

    @abc.abstractmethod
    def refine(self, weight: Array, gram: Array, mask: Array, frozen: Array, max_swaps: int,
               refresh_every: int, product: Optional[Array] = None) -> SwapResult:
        """1-swap refinement inside the budget (``_swaps.py``); ``frozen`` entries stay kept;
        ``product``: ``(W ⊙ (1 − mask)) G`` if the caller has it."""


@dataclasses.dataclass(frozen=True)
class _KeepK(Budget):
    """A budget that keeps ``k`` weights per unit under a top-k oracle (``PerRow``, ``LayerBudget``)."""

    k: int

    @property
    def per_unit(self) -> int:
        return self.k

    @abc.abstractmethod
    def _k_range(self, d_out: int, d_in: int) -> tuple[int, str, str]:
        """The largest ``k`` a ``(d_out, d_in)`` layer allows, its name in messages, and what they add."""

    def check(self, d_out: int, d_in: int) -> None:
        owner = type(self).__name__
        check_int(f"{owner}.k", self.k)
        most, named, why = self._k_range(d_out, d_in)
        if not 1 <= self.k <= most:
            raise ValueError(f"{owner}.k = {self.k} is outside 1..{named} = 1..{most}{why}.")

    def oracle(self, method: str = "search"):
        return TopKLMO(self.k, method)


@dataclasses.dataclass(frozen=True)
class PerRow(_KeepK):
    """Keep exactly ``k`` weights in every output row.

    Relaxed polytope per row: ``{m : 0 ≤ m ≤ 1, Σ_j m_j ≤ k}``.

    Example:
      >>> fw_jax.solve_layer(W, G, fw_jax.PerRow(W.shape[1] // 2))  # the same as passing the int
    """

    separable_rows = True

    def _k_range(self, d_out, d_in):
        return d_in, "d_in", ": the number of weights kept per row must be at least 1 and at most the row length"

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.k * d_out

    def round(self, keys, count=None):
        return top_count_units(tuple(keys), self.k if count is None else count)

    def check_mask(self, kept, what="mask"):
        counts = kept.sum(axis=1)
        bad = np.flatnonzero(counts != self.k)
        if bad.size:
            raise ValueError(
                f"{what} breaks the budget: row {bad[0]} keeps {counts[bad[0]]}, "
                f"expected exactly k = {self.k} per row ({bad.size} rows differ)."
            )

    def refine(self, weight, gram, mask, frozen, max_swaps, refresh_every, product=None):
        return refine_rows(weight, gram, mask, frozen, max_swaps, refresh_every, product)


@dataclasses.dataclass(frozen=True)
class NM(Budget):
    """Keep exactly ``n`` weights in every block of ``m`` consecutive inputs of a row (2:4 keeps 2).

    Relaxed polytope per block: ``{m : 0 ≤ m ≤ 1, Σ_{j ∈ block} m_j ≤ n}``.

    Example:
      >>> fw_jax.solve_layer(W, G, fw_jax.NM(2, 4)).mask  # 2 of every 4 consecutive inputs kept
    """

    n: int
    m: int
    separable_rows = True

    @classmethod
    def parse(cls, text: str) -> "NM":
        """``"2:4"`` → ``NM(2, 4)`` (n kept of every m); ``ValueError`` naming the expected form."""
        try:
            n, m = (int(part) for part in str(text).split(":"))
        except ValueError:
            raise ValueError(f"an n:m pattern is two integers 'n:m' (2:4 keeps 2 of every 4); got {text!r}") from None
        return cls(n, m)

    @property
    def per_unit(self) -> int:
        return self.n

    @property
    def pattern(self) -> tuple[int, int]:
        return (self.n, self.m)

    def check(self, d_out: int, d_in: int) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            check_int(f"NM.{name}", value)
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

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.n * (d_in // self.m) * d_out

    def oracle(self, method: str = "search"):
        return NMLMO(self.n, self.m)

    def round(self, keys, count=None):
        keys = _bool_keys(keys)
        d_out, d_in = keys[0].shape
        blocks = tuple(k.reshape(d_out, d_in // self.m, self.m) for k in keys)
        rank = group_ranks(lexicographic_better(blocks))
        return (rank < (self.n if count is None else count)).reshape(d_out, d_in)

    def check_mask(self, kept, what="mask"):
        d_out, d_in = kept.shape
        counts = kept.reshape(d_out, d_in // self.m, self.m).sum(axis=-1)
        bad = np.argwhere(counts != self.n)
        if bad.size:
            row, block = bad[0]
            raise ValueError(
                f"{what} breaks the budget: row {row}, block {block} keeps "
                f"{counts[row, block]}, expected exactly n = {self.n} of every m = {self.m}."
            )

    def refine(self, weight, gram, mask, frozen, max_swaps, refresh_every, product=None):
        return refine_blocks(weight, gram, mask, frozen, self.m, max_swaps, refresh_every, product)


@dataclasses.dataclass(frozen=True)
class LayerBudget(_KeepK):
    """Keep exactly ``k`` weights in the whole ``(d_out, d_in)`` matrix.

    Relaxed polytope: ``{M : 0 ≤ M ≤ 1, Σ_ij M_ij ≤ k}``. Rows are coupled only through the LMO.

    Example:
      >>> fw_jax.solve_layer(W, G, fw_jax.LayerBudget(W.size // 2)).mask.sum()  # half the layer, any rows
    """

    def _k_range(self, d_out, d_in):
        return d_out * d_in, "d_out*d_in", ""

    def total_kept(self, d_out: int, d_in: int) -> int:
        return self.k

    def units(self, x):
        return x[None]

    def from_units(self, x):
        return x[0]

    def unit_totals(self, row_values):
        return jnp.sum(row_values, keepdims=True)

    def rows_of_units(self, unit_values):
        return unit_values[0]

    def round(self, keys, count=None):
        return top_count_units(tuple(jnp.asarray(k)[None] for k in keys), self.k if count is None else count)[0]

    def check_mask(self, kept, what="mask"):
        if int(kept.sum()) != self.k:
            raise ValueError(
                f"{what} breaks the budget: it keeps {int(kept.sum())}, "
                f"expected exactly K = {self.k} in the layer."
            )

    def refine(self, weight, gram, mask, frozen, max_swaps, refresh_every, product=None):
        return refine_whole(weight, gram, mask, frozen, max_swaps, refresh_every, product)


def as_budget(budget: Union[int, tuple[int, int], str, Budget]) -> Budget:
    """A budget from what users write: an ``int`` k (``PerRow(k)``), an ``(n, m)`` tuple or an
    ``"n:m"`` string (``NM(n, m)``), or a budget object (passed through)."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        return PerRow(int(budget))
    if isinstance(budget, tuple) and len(budget) == 2:
        return NM(*(int(v) if isinstance(v, np.integer) else v for v in budget))
    if isinstance(budget, str) and ":" in budget:
        return NM.parse(budget)
    raise ValueError(
        f"budget must be an int k (weights kept per row), an (n, m) tuple or 'n:m' string (n kept "
        f"of every m), PerRow(k), NM(n, m) or LayerBudget(k); got {budget!r}."
    )


def round_to_budget(keys: tuple[Array, ...], budget: Union[int, Budget], count: Optional[Array] = None) -> Array:
    """Binary ``(d_out, d_in)`` mask with exactly the budget's count kept per unit (see
    :meth:`Budget.round`). Rounding a relaxed mask uses the keys ``(fixed, relaxed, saliency)``:
    fixed entries first, then larger relaxed values, then the warm start's saliency.

    Example:
      >>> round_to_budget((jnp.array([[0.2, 0.9, 0.5]]),), PerRow(2))
      Array([[False,  True,  True]], dtype=bool)
    """
    return as_budget(budget).round(keys, count)


def swap_refine(
    weight: Array,
    gram: Array,
    mask: Array,
    budget: Union[int, Budget],
    *,
    frozen: Optional[Array] = None,
    max_swaps: int = 512,
    refresh_every: int = 64,
) -> SwapResult:
    """Refine a binary mask by error-decreasing 1-swaps within each budget unit (``_swaps.py``
    does the swapping; the budget chooses which of its refinements, :meth:`Budget.refine`).

    Args:
      weight: ``(d_out, d_in)`` float weights.
      gram: ``(d_in, d_in)`` Gram matrix.
      mask: ``(d_out, d_in)`` boolean mask meeting ``budget``.
      budget: the budget the mask meets (a :class:`~fw_jax.solver.Budget` or an int k); swaps
        preserve it.
      frozen: optional boolean ``(d_out, d_in)``; these kept entries are never pruned.
      max_swaps: static cap on swap steps (each step swaps at most once per unit).
      refresh_every: static; how often ``c = G r`` is recomputed densely.

    Returns:
      :class:`~fw_jax.solver.SwapResult` with the refined mask (never worse per unit), swap counts
      and the product ``(W ⊙ (1 − mask)) G`` of the refined mask.
    """
    mask = mask.astype(bool)
    frozen = jnp.zeros(mask.shape, bool) if frozen is None else frozen.astype(bool)
    return as_budget(budget).refine(weight, gram, mask, frozen, max_swaps, refresh_every)
