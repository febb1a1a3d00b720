"""Rounding: from scores (or a relaxed mask) to a binary mask that meets the budget exactly.

``round_to_budget(keys, budget)`` keeps, in every budget unit (row, n:m block, or the whole
layer), the entries that rank first under the lexicographic order of ``keys`` (larger first,
first key most important). Remaining ties go to the lower index (row-major for a layer budget),
so rounding is a pure, deterministic function. Rounding a relaxed mask uses the keys
``(fixed, relaxed_mask, saliency)``: fixed entries first, then larger relaxed values, then the
warm start's saliency.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import Array

from fw_jax.solver._budgets import NM, Budget, LayerBudget, PerRow
from fw_jax.solver._select import group_ranks, lexicographic_better, top_count_lexsort

__all__ = ["round_to_budget"]


def round_to_budget(
    keys: tuple[Array, ...], budget: Budget, count: Optional[Array] = None
) -> Array:
    """Binary ``(d_out, d_in)`` mask keeping the best entries of every budget unit.

    Args:
      keys: ``(d_out, d_in)`` numeric or boolean arrays, most important first; larger is better.
      budget: ``PerRow``, ``NM`` or ``LayerBudget`` (already checked against the shape).
      count: keep this many per unit (per block for n:m) instead of the budget's count; may be
        traced.

    Returns:
      Boolean mask with exactly the budget's count kept per unit.

    Example:
      >>> round_to_budget((jnp.array([[0.2, 0.9, 0.5]]),), PerRow(2))
      Array([[False,  True,  True]], dtype=bool)
    """
    keys = tuple(jnp.asarray(k) for k in keys)
    keys = tuple(k.astype(jnp.int32) if k.dtype == jnp.bool_ else k for k in keys)
    d_out, d_in = keys[0].shape
    if isinstance(budget, PerRow):
        count = budget.k if count is None else count
        return jax.vmap(lambda *row: top_count_lexsort(row, count))(*keys)
    if isinstance(budget, LayerBudget):
        return top_count_lexsort(keys, budget.k if count is None else count)
    if isinstance(budget, NM):
        blocks = tuple(k.reshape(d_out, d_in // budget.m, budget.m) for k in keys)
        rank = group_ranks(lexicographic_better(blocks))
        return (rank < (budget.n if count is None else count)).reshape(d_out, d_in)
    raise ValueError(f"unknown budget {budget!r}")
