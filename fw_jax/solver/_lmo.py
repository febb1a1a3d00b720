"""Linear minimization oracles over the relaxed mask polytopes.

An LMO maps a gradient ``g`` (one budget unit) to a vertex ``V = argmin_{V ∈ C} ⟨g, V⟩`` of the
relaxed polytope ``C``. With a set ``F`` of fixed entries (forced to 1), ``C`` is the face
``{m ∈ C : m_F = 1}`` and the vertex is ``F`` plus the best choice for the remaining budget.
Only entries with ``g < 0`` lower ``⟨g, V⟩``, so a vertex may keep fewer than the budget.

Ties between equal gradient entries go to the lower index, so every oracle is deterministic.
LMOs are small frozen dataclasses: hashable, so they are static arguments of the compiled solver.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array

from fw_jax.solver._select import (
    ThresholdHint,
    group_ranks,
    lexicographic_better,
    smallest_mask_bisect,
    smallest_mask_search,
    smallest_mask_topk,
    smallest_mask_units,
    smallest_mask_units_hinted,
)

__all__ = ["TopKLMO", "NMLMO"]


@dataclasses.dataclass(frozen=True)
class TopKLMO:
    """Oracle of the capped simplex ``{m : 0 ≤ m ≤ 1, Σ m ≤ k}`` over a whole unit.

    The vertex is 1 on the (up to) ``k − |F|`` most negative entries of ``g`` outside ``F``
    that are ``< 0``, and 1 on ``F``. The unit may be a row (``PerRow``) or a matrix
    (``LayerBudget``).

    With ``exact=True`` the polytope is the hypersimplex ``{0 ≤ m ≤ 1, Σ m = k}`` (the hull of
    masks keeping exactly ``k``) and the vertex takes the ``k − |F|`` smallest entries whatever
    their sign; pairwise steps need this form.

    Attributes:
      k: budget of the unit.
      method: ``"bisect"`` (threshold bisection on the float bits: streaming passes, the
        fastest on CPU, see ``benchmarks/``), ``"search"`` (interpolation + bisection on the
        same keys, fewer passes) or ``"top_k"`` (``lax.top_k``). Same result.
      hint: for the threshold methods, let iterative callers (the Frank-Wolfe loops) start each
        search from the previous call's thresholds (:meth:`batched_hinted`). Same result.
    """

    k: int
    method: Literal["bisect", "search", "top_k"] = "bisect"
    exact: bool = False
    hint: bool = True

    def _smallest(self, values: Array, count: Array, eligible: Array) -> Array:
        if self.method == "bisect":
            return smallest_mask_bisect(values, count, eligible)
        if self.method == "search":
            return smallest_mask_search(values, count, eligible)
        if self.method == "top_k":
            return smallest_mask_topk(values, count, eligible, min(self.k, values.size))
        raise ValueError(f"TopKLMO.method must be 'bisect', 'search' or 'top_k', got {self.method!r}")

    def __call__(self, gradient: Array, fixed: Array) -> Array:
        free_budget = self.k - jnp.sum(fixed, dtype=jnp.int32)
        eligible = ~fixed if self.exact else (gradient < 0) & ~fixed
        return (self._smallest(gradient, free_budget, eligible) | fixed).astype(gradient.dtype)

    def batched(self, gradient: Array, fixed: Array) -> Array:
        """``vmap(self)`` over a leading unit axis; the threshold methods run batched so that
        their tie-break step is skipped for the whole stack when no unit needs it."""
        if self.method == "top_k":
            return jax.vmap(self)(gradient, fixed)
        free_budget, eligible = self._units_room(gradient, fixed)
        return (smallest_mask_units(gradient, free_budget, eligible, self.method) | fixed).astype(gradient.dtype)

    def _units_room(self, gradient: Array, fixed: Array) -> tuple[Array, Array]:
        """Per unit of a stack: the budget left after ``fixed``, and the entries that may take it."""
        free_budget = self.k - jnp.sum(fixed.reshape(gradient.shape[0], -1), axis=-1, dtype=jnp.int32)
        return free_budget, ~fixed if self.exact else (gradient < 0) & ~fixed

    @property
    def hinted(self) -> bool:
        """Whether callers should use :meth:`batched_hinted` (threshold methods, ``hint`` on)."""
        return self.hint and self.method in ("bisect", "search")

    def empty_hint(self, units: int, dtype) -> ThresholdHint:
        """The hint of :meth:`batched_hinted`'s first call."""
        return ThresholdHint.empty(units, dtype)

    def batched_hinted(self, gradient: Array, fixed: Array, hint: ThresholdHint) -> tuple[Array, ThresholdHint]:
        """:meth:`batched`, warm-started from the thresholds of the previous call (the same
        vertices in fewer counting passes when the gradient changes a little between calls).
        Returns the vertices and the hint for the next call."""
        free_budget, eligible = self._units_room(gradient, fixed)
        chosen, hint = smallest_mask_units_hinted(gradient, free_budget, eligible, hint)
        return (chosen | fixed).astype(gradient.dtype), hint

    def away(self, gradient: Array, mask: Array, fixed: Array) -> Array:
        """Away vertex of the hypersimplex in decomposition-invariant form: the worst vertex
        (largest ``⟨g, V⟩``) whose support lies in the face of ``mask``: every entry at 1 is in
        it, no entry at 0 is, and the ``k − #ones`` largest-gradient fractional entries fill it.
        """
        ones = (mask >= 1) | fixed
        fractional = (mask > 0) & ~ones
        room = self.k - jnp.sum(ones, dtype=jnp.int32)
        return (self._smallest(-gradient, room, fractional) | ones).astype(gradient.dtype)


@dataclasses.dataclass(frozen=True)
class NMLMO:
    """Oracle of the n:m polytope: each block of ``m`` consecutive entries has ``Σ ≤ n``.

    Per block: 1 on ``F`` and on the ``n − |F ∩ block|`` most negative entries ``< 0`` outside
    ``F`` (with ``exact=True``: ``Σ_block m = n``, the smallest entries whatever their sign). Ranks within a block come from ``m × m`` pairwise comparisons (no sort: m is small).
    """

    n: int
    m: int
    exact: bool = False

    def _best_in_blocks(self, score: Array, eligible: Array, forced: Array) -> Array:
        """Per block: ``forced`` plus the ``n − |forced|`` eligible entries of largest score."""
        blocks = score.reshape(*score.shape[:-1], -1, self.m)
        eligible = eligible.reshape(blocks.shape)
        forced = forced.reshape(blocks.shape)
        rank = group_ranks(lexicographic_better((jnp.where(eligible, blocks, -jnp.inf),)))
        room = self.n - jnp.sum(forced, axis=-1, keepdims=True)
        chosen = (eligible & (rank < room)) | forced
        return chosen.reshape(score.shape).astype(score.dtype)

    def __call__(self, gradient: Array, fixed: Array) -> Array:
        eligible = ~fixed if self.exact else (gradient < 0) & ~fixed
        return self._best_in_blocks(-gradient, eligible, fixed)

    def away(self, gradient: Array, mask: Array, fixed: Array) -> Array:
        """Away vertex per block (see :meth:`TopKLMO.away`), with ``Σ_block m = n``."""
        ones = (mask >= 1) | fixed
        return self._best_in_blocks(gradient, (mask > 0) & ~ones, ones)
