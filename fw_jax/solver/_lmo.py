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

import jax.numpy as jnp
from jax import Array

from fw_jax.solver._select import (
    group_ranks,
    lexicographic_better,
    smallest_mask_bisect,
    smallest_mask_topk,
)

__all__ = ["TopKLMO", "NMLMO"]


@dataclasses.dataclass(frozen=True)
class TopKLMO:
    """Oracle of the capped simplex ``{m : 0 ≤ m ≤ 1, Σ m ≤ k}`` over a whole unit.

    The vertex is 1 on the (up to) ``k − |F|`` most negative entries of ``g`` outside ``F``
    that are ``< 0``, and 1 on ``F``. The unit may be a row (``PerRow``) or a matrix
    (``LayerBudget``).

    Attributes:
      k: budget of the unit.
      method: ``"bisect"`` (threshold bisection on the float bits: streaming passes, the
        fastest on CPU, see ``benchmarks/``) or ``"top_k"`` (``lax.top_k``). Same result.
    """

    k: int
    method: Literal["bisect", "top_k"] = "bisect"

    def __call__(self, gradient: Array, fixed: Array) -> Array:
        free_budget = self.k - jnp.sum(fixed, dtype=jnp.int32)
        eligible = (gradient < 0) & ~fixed
        if self.method == "bisect":
            chosen = smallest_mask_bisect(gradient, free_budget, eligible)
        elif self.method == "top_k":
            chosen = smallest_mask_topk(gradient, free_budget, eligible, min(self.k, gradient.size))
        else:
            raise ValueError(f"TopKLMO.method must be 'bisect' or 'top_k', got {self.method!r}")
        return (chosen | fixed).astype(gradient.dtype)


@dataclasses.dataclass(frozen=True)
class NMLMO:
    """Oracle of the n:m polytope: each block of ``m`` consecutive entries has ``Σ ≤ n``.

    Per block: 1 on ``F`` and on the ``n − |F ∩ block|`` most negative entries ``< 0`` outside
    ``F``. Ranks within a block come from ``m × m`` pairwise comparisons (no sort: m is small).
    """

    n: int
    m: int

    def __call__(self, gradient: Array, fixed: Array) -> Array:
        blocks = gradient.reshape(*gradient.shape[:-1], -1, self.m)
        fixed_blocks = fixed.reshape(blocks.shape)
        eligible = (blocks < 0) & ~fixed_blocks
        score = jnp.where(eligible, -blocks, -jnp.inf)
        rank = group_ranks(lexicographic_better((score,)))
        free_budget = self.n - jnp.sum(fixed_blocks, axis=-1, keepdims=True)
        chosen = eligible & (rank < free_budget)
        return (chosen | fixed_blocks).reshape(gradient.shape).astype(gradient.dtype)
