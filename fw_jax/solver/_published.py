"""SparseFW exactly as published (docs/design.md §14): the reference our solver is measured against.

A deliberately plain implementation, independent of ``_frank_wolfe.py``: a dense gradient GEMM
every iteration, the open-loop step ``η_t = 2/(t+2)``, a fixed number of iterations, rounding by
top-k of the relaxed mask (fixed entries first), and no guard against rounding to a mask worse
than the warm start (the published recipe has none).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
from jax import Array, lax

from fw_jax.solver._budgets import Budget, as_budget
from fw_jax.solver._objective import layer_error
from fw_jax.solver._saliency import saliency_scores
from fw_jax.solver._validation import check_alpha, check_layer_inputs

__all__ = ["PublishedResult", "sparsefw_published"]


class PublishedResult(NamedTuple):
    mask: Array  #: (d_out, d_in) boolean.
    loss: Array  #: error of ``mask``.
    warm_loss: Array  #: error of the warm-start mask.
    relaxed_loss: Array  #: error of the final relaxed iterate.


@functools.partial(jax.jit, static_argnames=("budget", "iterations", "warm_start", "lmo_method"))
def _published(weight, gram, alpha, *, budget, iterations, warm_start, lmo_method):
    scores = saliency_scores(warm_start, weight, gram)
    warm = budget.round((scores,))
    fixed = budget.round((scores,), count=budget.fixed_count(alpha))
    lmo = budget.oracle(lmo_method)  # over the stack of units; its state carries its last thresholds
    target = weight @ gram

    def step(t, carry):
        mask, state = carry
        gradient = -2 * weight * (target - (weight * mask) @ gram)
        vertex, state = lmo(budget.units(gradient), budget.units(fixed), state)
        eta = 2.0 / (t + 2.0)
        return mask + eta * (budget.from_units(vertex) - mask), state

    units = budget.units(weight).shape[0]
    relaxed, _ = lax.fori_loop(0, iterations, step, (warm.astype(weight.dtype), lmo.init(units, weight.dtype)))
    mask = budget.round((fixed, relaxed))
    return PublishedResult(
        mask=mask,
        loss=layer_error(weight, gram, mask),
        warm_loss=layer_error(weight, gram, warm),
        relaxed_loss=layer_error(weight, gram, relaxed),
    )


def sparsefw_published(
    weight: Array,
    gram: Array,
    budget: Union[int, Budget],
    *,
    alpha: float = 0.9,
    iterations: int = 2000,
    warm_start: str = "wanda",
    lmo_method: str = "top_k",
) -> PublishedResult:
    """The published SparseFW recipe: warm start, fix ``⌊α·k⌋``, ``iterations`` open-loop FW
    steps, round.

    Args:
      weight: ``(d_out, d_in)``; gram: ``(d_in, d_in)``; budget: as in ``solve_layer``.
      alpha: fixed fraction (0.9 as published).
      iterations: Frank-Wolfe iterations (2000 as published).
      warm_start: ``"wanda"`` (published), ``"ria"`` or ``"magnitude"``.
      lmo_method: ``"top_k"`` (the plain choice), ``"bisect"`` or ``"search"`` (same vertices,
        faster on CPU; see :class:`~fw_jax.solver.TopKLMO`).

    Returns:
      :class:`PublishedResult`.

    Example:
      >>> res = fw_jax.sparsefw_published(W, G, k)  # α = 0.9, 2000 open-loop iterations
      >>> float(res.loss), float(res.warm_loss)
    """
    budget = as_budget(budget)
    weight, gram = check_layer_inputs(weight, gram, budget)
    check_alpha(alpha)
    return _published(
        weight,
        (gram + gram.T) / 2,
        jnp.asarray(alpha, weight.dtype),
        budget=budget,
        iterations=int(iterations),
        warm_start=warm_start,
        lmo_method=lmo_method,
    )
