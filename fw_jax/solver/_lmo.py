"""Linear minimization oracles over the relaxed mask polytopes.

An LMO maps a gradient ``g`` (one budget unit) to a vertex ``V = argmin_{V ∈ C} ⟨g, V⟩`` of the
relaxed polytope ``C``. With a set ``F`` of fixed entries (forced to 1), ``C`` is the face
``{m ∈ C : m_F = 1}`` and the vertex is ``F`` plus the best choice for the remaining budget.
Only entries with ``g < 0`` lower ``⟨g, V⟩``, so a vertex may keep fewer than the budget.

Ties between equal gradient entries go to the lower index, so every oracle is deterministic.
LMOs are small frozen dataclasses: hashable, so they are static arguments of the compiled solver.

The protocol (:class:`Oracle`), always over a stack of units ``(units, *unit_shape)``, with the
oracle's state explicit, as optax's gradient transformations carry theirs::

    state = lmo.init(units, dtype)
    vertex, state = lmo(gradient, fixed, state)     # once per Frank-Wolfe iteration
    away = lmo.away(gradient, mask, fixed)          # pairwise steps only

The state lets an iterative caller warm-start each call from the previous one (the threshold
oracles keep their last thresholds: the same vertices in fewer counting passes); stateless
oracles return ``()``. ``lmo.unit(gradient, fixed)`` is the plain oracle of one unit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol

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

__all__ = ["Oracle", "TopKLMO", "NMLMO", "vertices"]


class Oracle(Protocol):
    """What the Frank-Wolfe loops ask of an LMO (see the module docstring)."""

    exact: bool  #: the polytope keeps exactly the budget (hypersimplex), as pairwise steps need

    def init(self, units: int, dtype) -> Any: ...

    def __call__(self, gradient: Array, fixed: Array, state: Any) -> tuple[Array, Any]: ...

    def away(self, gradient: Array, mask: Array, fixed: Array) -> Array: ...


def vertices(lmo: Oracle, gradient: Array, fixed: Array) -> Array:
    """One stateless call of ``lmo`` over a stack of units (a fresh state)."""
    return lmo(gradient, fixed, lmo.init(gradient.shape[0], gradient.dtype))[0]


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
      method: ``"search"`` (interpolation + bisection on the float bits of the entries),
        ``"bisect"`` (bisection on the same keys) or ``"top_k"`` (``lax.top_k``). Same
        vertices; their speeds are in ``results/variants.md``.
      hint: for the threshold methods, start each search from the previous call's thresholds
        (carried in the state). Same vertices.
    """

    k: int
    method: Literal["search", "bisect", "top_k"] = "search"
    exact: bool = False
    hint: bool = True

    def __post_init__(self):
        if self.method not in ("search", "bisect", "top_k"):
            raise ValueError(f"TopKLMO.method must be 'search', 'bisect' or 'top_k', got {self.method!r}")

    def _smallest(self, values: Array, count: Array, eligible: Array) -> Array:
        if self.method == "bisect":
            return smallest_mask_bisect(values, count, eligible)
        if self.method == "search":
            return smallest_mask_search(values, count, eligible)
        return smallest_mask_topk(values, count, eligible, min(self.k, values.size))

    def unit(self, gradient: Array, fixed: Array) -> Array:
        """The vertex of one unit."""
        free_budget = self.k - jnp.sum(fixed, dtype=jnp.int32)
        eligible = ~fixed if self.exact else (gradient < 0) & ~fixed
        return (self._smallest(gradient, free_budget, eligible) | fixed).astype(gradient.dtype)

    @property
    def _hinted(self) -> bool:
        return self.hint and self.method in ("bisect", "search")

    def init(self, units: int, dtype) -> Any:
        return ThresholdHint.empty(units, dtype) if self._hinted else ()

    def __call__(self, gradient: Array, fixed: Array, state: Any) -> tuple[Array, Any]:
        if self.method == "top_k":
            return jax.vmap(self.unit)(gradient, fixed), state
        # The threshold methods select for the whole stack at once, so that their tie-break
        # step is skipped for every unit when none needs it.
        free_budget = self.k - jnp.sum(fixed.reshape(gradient.shape[0], -1), axis=-1, dtype=jnp.int32)
        eligible = ~fixed if self.exact else (gradient < 0) & ~fixed
        if self._hinted:
            chosen, state = smallest_mask_units_hinted(gradient, free_budget, eligible, state)
        else:
            chosen = smallest_mask_units(gradient, free_budget, eligible, self.method)
        return (chosen | fixed).astype(gradient.dtype), state

    def away(self, gradient: Array, mask: Array, fixed: Array) -> Array:
        """Away vertices of the hypersimplex in decomposition-invariant form: per unit, the
        worst vertex (largest ``⟨g, V⟩``) whose support lies in the face of ``mask``: every
        entry at 1 is in it, no entry at 0 is, and the ``k − #ones`` largest-gradient
        fractional entries fill it."""

        def one(g, msk, fix):
            ones = (msk >= 1) | fix
            fractional = (msk > 0) & ~ones
            room = self.k - jnp.sum(ones, dtype=jnp.int32)
            return (self._smallest(-g, room, fractional) | ones).astype(g.dtype)

        return jax.vmap(one)(gradient, mask, fixed)


@dataclasses.dataclass(frozen=True)
class NMLMO:
    """Oracle of the n:m polytope: each block of ``m`` consecutive entries has ``Σ ≤ n``.

    Per block: 1 on ``F`` and on the ``n − |F ∩ block|`` most negative entries ``< 0`` outside
    ``F`` (with ``exact=True``: ``Σ_block m = n``, the smallest entries whatever their sign).
    Ranks within a block come from ``m × m`` pairwise comparisons (no sort: m is small), so
    the same code serves one unit and a stack. Stateless.
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

    def unit(self, gradient: Array, fixed: Array) -> Array:
        """The vertex of one unit (or of a stack: blocks are independent)."""
        eligible = ~fixed if self.exact else (gradient < 0) & ~fixed
        return self._best_in_blocks(-gradient, eligible, fixed)

    def init(self, units: int, dtype) -> Any:
        return ()

    def __call__(self, gradient: Array, fixed: Array, state: Any) -> tuple[Array, Any]:
        return self.unit(gradient, fixed), state

    def away(self, gradient: Array, mask: Array, fixed: Array) -> Array:
        """Away vertices per block (see :meth:`TopKLMO.away`), with ``Σ_block m = n``."""
        ones = (mask >= 1) | fixed
        return self._best_in_blocks(gradient, (mask > 0) & ~ones, ones)
