"""SparseFW exactly as published (DESIGN.md §3): the reference our solver is measured against.

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

from fw_jax.solver._budgets import NM, Budget, as_budget
from fw_jax.solver._lmo import NMLMO, TopKLMO
from fw_jax.solver._objective import layer_error
from fw_jax.solver._rounding import round_to_budget
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
    warm = round_to_budget((scores,), budget)
    per_unit = budget.n if isinstance(budget, NM) else budget.k
    fixed = round_to_budget((scores,), budget, count=jnp.floor(alpha * per_unit + 1e-9).astype(jnp.int32))
    # lmo: (gradient, fixed, hint) -> (vertex, hint); the threshold oracles carry their last
    # thresholds from one iteration to the next (same vertices, fewer counting passes).
    hint = None
    if isinstance(budget, NM):
        lmo = lambda g, f, h: (jax.vmap(NMLMO(budget.n, budget.m))(g, f), h)  # noqa: E731
    elif budget.is_separable:
        rows = TopKLMO(budget.k, lmo_method)
        if rows.hinted:
            lmo, hint = rows.batched_hinted, rows.empty_hint(weight.shape[0], weight.dtype)
        else:
            lmo = lambda g, f, h: (rows.batched(g, f), h)  # noqa: E731
    else:
        single = TopKLMO(budget.k, lmo_method)
        lmo = lambda g, f, h: (single(g, f), h)  # noqa: E731  (one unit: the whole layer)
    target = weight @ gram

    def step(t, carry):
        mask, hint = carry
        gradient = -2 * weight * (target - (weight * mask) @ gram)
        vertex, hint = lmo(gradient, fixed, hint)
        eta = 2.0 / (t + 2.0)
        return mask + eta * (vertex - mask), hint

    relaxed, _ = lax.fori_loop(0, iterations, step, (warm.astype(weight.dtype), hint))
    mask = round_to_budget((fixed, relaxed), budget)
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
