"""Greedy saliency scores and masks: the baselines and the warm starts (docs/design.md §14).

Every mask keeps the highest scores within each budget unit (row, n:m block, or layer); ties go
to the lower index, which matters on dequantized weights where equal magnitudes are common.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array

from fw_jax.solver._budgets import Budget, as_budget

__all__ = [
    "magnitude_scores",
    "wanda_scores",
    "ria_scores",
    "saliency_scores",
    "magnitude_mask",
    "wanda_mask",
    "ria_mask",
    "saliency_mask",
]


def magnitude_scores(weight: Array, gram: Array | None = None) -> Array:
    """``|W_ij|`` (``gram`` is ignored).

    Example:
      >>> fw_jax.saliency_mask(fw_jax.magnitude_scores(W), k)
    """
    return jnp.abs(weight)


def wanda_scores(weight: Array, gram: Array) -> Array:
    """Wanda: ``|W_ij| · ‖X_j‖₂ = |W_ij| · sqrt(G_jj)``.

    Example:
      >>> fw_jax.saliency_mask(fw_jax.wanda_scores(W, G), k)  # = fw_jax.wanda_mask(W, G, k)
    """
    return jnp.abs(weight) * jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0))[None, :]


def ria_scores(weight: Array, gram: Array, a: float = 0.5) -> Array:
    """RIA: ``(|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · sqrt(G_jj)^a``.

    Rows or columns that are entirely zero contribute 0 (not NaN).

    Example:
      >>> fw_jax.saliency_mask(fw_jax.ria_scores(W, G), k)  # = fw_jax.ria_mask(W, G, k)
    """
    magnitude = jnp.abs(weight)
    row_sum = jnp.sum(magnitude, axis=1, keepdims=True)
    col_sum = jnp.sum(magnitude, axis=0, keepdims=True)
    relative = magnitude / jnp.where(row_sum > 0, row_sum, 1) + magnitude / jnp.where(
        col_sum > 0, col_sum, 1
    )
    activation = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0)) ** a
    return relative * activation[None, :]


_SCORES = {"magnitude": magnitude_scores, "wanda": wanda_scores, "ria": ria_scores}


def saliency_scores(name: str, weight: Array, gram: Array) -> Array:
    """Scores by name: ``"magnitude"``, ``"wanda"`` or ``"ria"``."""
    if name not in _SCORES:
        raise ValueError(f"saliency must be one of {sorted(_SCORES)}, got {name!r}")
    return _SCORES[name](weight, gram)


def saliency_mask(scores: Array, budget: int | Budget) -> Array:
    """Binary mask keeping the highest ``scores`` in every budget unit (lower index on ties).

    Example:
      >>> fw_jax.saliency_mask(jnp.abs(W), k)  # any scores: the top k of every row
    """
    budget = as_budget(budget)
    budget.check(*jnp.shape(scores))
    return _mask_jit(jnp.asarray(scores), budget=budget)


@functools.partial(jax.jit, static_argnames="budget")
def _mask_jit(scores, *, budget):
    return budget.round((scores,))


def magnitude_mask(weight: Array, budget: int | Budget) -> Array:
    """Magnitude pruning mask for ``budget``.

    Example:
      >>> fw_jax.magnitude_mask(W, k).sum(axis=1)  # k in every row
    """
    return saliency_mask(magnitude_scores(weight), budget)


def wanda_mask(weight: Array, gram: Array, budget: int | Budget) -> Array:
    """Wanda mask for ``budget``.

    Example:
      >>> fw_jax.wanda_mask(W, G, fw_jax.NM(2, 4))
    """
    return saliency_mask(wanda_scores(weight, gram), budget)


def ria_mask(weight: Array, gram: Array, budget: int | Budget, a: float = 0.5) -> Array:
    """RIA mask for ``budget`` (exponent ``a`` on the activation norm).

    Example:
      >>> fw_jax.ria_mask(W, G, k)
    """
    return saliency_mask(ria_scores(weight, gram, a), budget)
