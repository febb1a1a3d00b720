"""Layer-pruning methods: one registry from a method's name to the function that chooses a
layer's mask (and, for some, new kept weights).

A method sees the :class:`Layer` problem (weights, the calibration Gram matrix ``gram``, the
matrix it should fit, ``fitted``, which is ``gram`` shrunk toward its diagonal when
``PruneSettings.shrinkage`` says so, and the budget) and returns a :class:`Pruned`. What every
method shares (reconstruction, the errors against Wanda, timing) is done by
``prune.prune_layer`` around it. To add a method: write its function here and add a
:class:`Method` to :data:`METHODS` (see ``docs/design.md`` §23, "Where to add").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from fw_jax.solver import (
    Budget, SolverOptions, mask_lower_bound, saliency_mask, saliency_scores, solve_layer, sparsefw_published, sparsegpt,
)

__all__ = ["Layer", "Method", "METHODS", "Pruned"]


class Layer(NamedTuple):
    """One layer's problem, as a method sees it."""

    weight: jax.Array  #: (d_out, d_in) float32.
    gram: jax.Array  #: (d_in, d_in) calibration Gram matrix; errors are reported on it.
    fitted: jax.Array  #: the Gram matrix the method fits (``gram`` shrunk, or ``gram``).
    budget: Budget
    settings: Any  #: the ``PruneSettings``.
    history: bool  #: record the solver's per-iteration history (plots).
    mask_error: Callable[[jax.Array], float]  #: ``‖WX − (M⊙W)X‖²`` of a mask, on ``gram``.


class Pruned(NamedTuple):
    mask: jax.Array  #: boolean, True = kept.
    weight: Optional[jax.Array] = None  #: new kept weights, if the method updates them.
    record: Optional[dict] = None  #: what the method reports about the layer (bounds, iterations ...).


@dataclasses.dataclass(frozen=True)
class Method:
    """A layer-pruning method.

    Attributes:
      summary: one line for ``fw-jax prune --help``.
      prune: ``Layer -> Pruned``.
      uses: the ``PruneSettings`` fields it reads beyond the budget; setting any other
        solver field away from its default is refused (it would be silently ignored).
      default_shrinkage: ``ρ`` when ``PruneSettings.shrinkage`` is ``None``.
    """

    summary: str
    prune: Callable[[Layer], Pruned]
    uses: tuple[str, ...] = ()
    default_shrinkage: float = 0.0


def _saliency(name: str) -> Callable[[Layer], Pruned]:
    def prune(layer: Layer) -> Pruned:
        return Pruned(saliency_mask(saliency_scores(name, layer.weight, layer.gram), layer.budget))

    return prune


def _sparsegpt(layer: Layer) -> Pruned:
    mask, new_weight = sparsegpt(layer.weight, layer.fitted, layer.budget)
    return Pruned(mask, new_weight)


def _published(layer: Layer) -> Pruned:
    return Pruned(sparsefw_published(layer.weight, layer.fitted, layer.budget, lmo_method="search").mask)


def _sparsefw(layer: Layer) -> Pruned:
    settings, weight, gram, budget = layer.settings, layer.weight, layer.gram, layer.budget
    sol = solve_layer(weight, layer.fitted, budget, warm_start=settings.warm_start, alpha=settings.alpha,
                      tol=settings.tol, options=settings.options.replace(history=layer.history))
    record: dict[str, Any] = dict(iterations=int(sol.iterations), swaps=int(sol.swaps), status=sol.status_name)
    bound, mask_error = float(sol.lower_bound), float(sol.loss)
    if settings.effective_shrinkage > 0:  # sol is of the shrunk problem: keep its numbers, certify the mask on G itself
        record.update(shrunk_warm_error=float(sol.warm_loss), shrunk_lower_bound=bound,
                      shrunk_certificate=float(sol.certificate))
        bound = float(mask_lower_bound(weight, gram, budget, sol.relaxed_mask, sol.mask))
        mask_error = layer.mask_error(sol.mask)
    else:
        record["warm_error"] = float(sol.warm_loss)
    if settings.certify_iter > 0:
        bound = max(bound, certify_mask(weight, gram, budget, sol.mask, settings.certify_iter))
    record["lower_bound"] = bound
    record["certificate"] = (mask_error - bound) / mask_error if mask_error > 0 else 0.0
    if layer.history:
        record["_history"] = {  # NaN marks iterations not run; JSON has null for that
            k: [None if not np.isfinite(x) else float(x) for x in np.asarray(v)]
            for k, v in sol.history._asdict().items()
        }
    return Pruned(sol.mask, None, record)


def certify_mask(weight, gram, budget, mask, iterations: int) -> float:
    """A proved lower bound on the layer's best error on ``gram``, from ``iterations`` plain
    Frank-Wolfe iterations (α = 0, exact line search, no swaps) started at ``mask``; only the
    bound is used, the mask is not changed (``PruneSettings.certify_iter``)."""
    check = solve_layer(weight, gram, budget, warm_start=mask, alpha=0.0, tol=0.0,
                        options=SolverOptions(max_iter=int(iterations), step_rule="exact", swaps=False))
    return float(check.lower_bound)


#: Every method by name (the CLI's ``--method`` choices, in this order).
METHODS: dict[str, Method] = {
    "magnitude": Method("keep the largest |W|", _saliency("magnitude")),
    "wanda": Method("keep the largest |W|·‖x‖ (Wanda; the warm start and the yardstick of the reports)",
                    _saliency("wanda")),
    "ria": Method("keep the largest relative importance × ‖x‖^0.5 (RIA)", _saliency("ria")),
    "sparsegpt": Method("SparseGPT: greedy mask with second-order updates of the kept weights", _sparsegpt),
    "sparsefw": Method("fw_jax: Frank-Wolfe on each layer's mask problem from a Wanda warm start, then 1-swaps",
                       _sparsefw, uses=("warm_start", "alpha", "tol", "options", "certify_iter"),
                       default_shrinkage=0.5),  # chosen by perplexity (results/quality.md)
    "sparsefw-published": Method("the seed paper's recipe: α = 0.9, 2000 open-loop Frank-Wolfe iterations",
                                 _published),
}
