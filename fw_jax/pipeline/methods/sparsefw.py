"""fw_jax's method: Frank-Wolfe on each layer's mask problem (:func:`fw_jax.solve_layer`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from fw_jax._checks import check_int
from fw_jax.solver import SolverOptions, mask_lower_bound, solve_layer

from . import Layer, Method, Pruned, register

WARM_STARTS = ("wanda", "ria", "magnitude")  #: the saliency masks Frank-Wolfe may start from
HISTORY_ROUNDINGS = 25  #: the plotted layer's history rounds the iterate at about this many iterations


def history_every(max_iter: int) -> int:
    """Every how many iterations the plotted layer's history records the rounded error: each
    costs a rounding and a product, and every one of 100 iterations would add a third of a
    block's time at 7B shapes (``results/scale.md``)."""
    return max(1, math.ceil(max_iter / HISTORY_ROUNDINGS))


@register
@dataclasses.dataclass(frozen=True)
class SparseFW(Method):
    """Frank-Wolfe on the relaxed mask problem of each layer, rounded, then 1-swaps.

    This is the recipe the pipeline runs; :func:`fw_jax.solve_layer` states the problem. They
    differ in one default: ``solve_layer`` fixes no entries (``alpha=0``), since it solves the
    problem it is given, while the recipe fixes 90% of each budget to the warm start's top
    weights (``alpha=0.9``, the seed paper's choice, confirmed by perplexity on held-out text in
    results/quality.md) and fits a Gram matrix shrunk halfway toward its diagonal
    (``default_shrinkage = 0.5``, chosen the same way).

    Attributes:
      warm_start: the saliency mask Frank-Wolfe starts from (``"wanda"``, ``"ria"``, ``"magnitude"``).
      alpha: fraction of each budget fixed to the warm start's top weights.
      tol: stop a row once its relaxed certificate ``gap / error`` is below it.
      options: the solver's :class:`~fw_jax.SolverOptions` (``history`` is set per layer).
      certify_iter: with entries fixed (α > 0) or a shrunk Gram matrix, the solve's own lower
        bound on ``G`` is weak (often 0, a certificate of 1). This many plain Frank-Wolfe
        iterations (α = 0, on ``G``) started from the chosen mask prove a better bound; the mask
        is not changed. On a real SmolLM2 block 50 iterations add about half the solve time and
        give a mean certificate of 0.56–0.67 (results/certify.md).
    """

    name = "sparsefw"
    summary = "fw_jax: Frank-Wolfe on each layer's mask problem from a Wanda warm start, then 1-swaps"
    default_shrinkage = 0.5  # chosen by perplexity (results/quality.md)
    records_history = True

    warm_start: str = "wanda"
    alpha: float = 0.9
    tol: float = 1e-4
    options: SolverOptions = SolverOptions()
    certify_iter: int = 0

    def __post_init__(self):
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}; got {self.warm_start!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] (the fraction of each budget fixed to the top "
                             f"saliency weights), got {self.alpha}")
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol)
                                              and self.tol >= 0):
            raise ValueError(f"tol must be a finite number ≥ 0, got {self.tol}")
        if not isinstance(self.options, SolverOptions):
            raise ValueError(f"options must be a fw_jax.SolverOptions, got {self.options!r}")
        check_int("certify_iter", self.certify_iter, least=0)

    def note(self, shrinkage: float) -> Optional[str]:
        if self.certify_iter == 0 and (self.alpha > 0 or shrinkage > 0):
            return ("note: with fixed entries (α > 0) or shrinkage the solve's own lower bound on G is weak "
                    "(cert - when it proves nothing); --certify N adds N plain Frank-Wolfe iterations for one")
        return None

    def _history(self, layer: Layer):
        return history_every(self.options.max_iter) if layer.history else False

    def prune(self, layer: Layer) -> Pruned:
        weight, gram, budget = layer.weight, layer.gram, layer.budget
        # Wanda's scores are the same on G and on its shrinkage (which keeps the diagonal): its mask,
        # computed once for the layer, is the warm start and the report's comparison.
        warm = layer.wanda() if self.warm_start == "wanda" else self.warm_start
        sol = solve_layer(weight, layer.fitted, budget, warm_start=warm, alpha=self.alpha,
                          tol=self.tol, options=self.options.replace(history=self._history(layer)))
        record: dict[str, Any] = dict(iterations=int(sol.iterations), swaps=int(sol.swaps), status=sol.status_name)
        bound, mask_error = float(sol.lower_bound), float(sol.loss)
        if layer.shrinkage > 0:  # sol is of the shrunk problem: keep its numbers, certify the mask on G itself
            record.update(shrunk_warm_error=float(sol.warm_loss), shrunk_lower_bound=bound,
                          shrunk_certificate=float(sol.certificate))
            bound = float(mask_lower_bound(weight, gram, budget, sol.relaxed_mask, sol.mask))
            mask_error = layer.mask_error(sol.mask)
        else:
            record["warm_error"] = float(sol.warm_loss)
        if self.certify_iter > 0:
            bound = max(bound, certify_mask(weight, gram, budget, sol.mask, self.certify_iter))
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
    bound is used, the mask is not changed (``SparseFW.certify_iter``)."""
    check = solve_layer(weight, gram, budget, warm_start=mask, alpha=0.0, tol=0.0,
                        options=SolverOptions(max_iter=int(iterations), step_rule="exact", swaps=False))
    return float(check.lower_bound)
