"""``solve_layer``: the whole mask problem of one linear layer in one compiled call.

Pipeline (docs/design.md §6-§11):

1. warm start: a saliency mask (magnitude, Wanda, RIA) or a given mask;
2. fix the top ``⌊α·k⌋`` saliency entries of every budget unit (α = 0: plain Frank-Wolfe);
3. Frank-Wolfe on the relaxed polytope from the warm mask (``_frank_wolfe.py``);
4. round within every budget unit (fixed first, then relaxed value, then saliency);
5. per unit, keep the better of the rounded mask and the warm mask, then refine by 1-swaps.

Steps 4-5 make the result never worse than the warm start, per row (or per layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import Array

from fw_jax.solver._budgets import Budget, as_budget
from fw_jax.solver._frank_wolfe import FWHistory, frank_wolfe, full_polytope_bound
from fw_jax.solver._options import SolverOptions
from fw_jax.solver._psd import PSD_TOLERANCE, negative_curvature
from fw_jax.solver._saliency import saliency_scores
from fw_jax.solver._steps import as_step_rule
from fw_jax.solver._validation import check_alpha, check_layer_inputs, check_tol, check_warm_mask, is_concrete

__all__ = ["Status", "LayerSolution", "mask_lower_bound", "solve_layer"]


class Status:
    """Integer status codes of :class:`LayerSolution` (arrays, so they survive ``jit``).

    Only the first two prove anything. With either of the last two no bound is claimed:
    ``lower_bound`` is ``-inf`` and ``gap`` and ``certificate`` are NaN.

    Example:
      >>> sol = fw_jax.solve_layer(W, G, k)
      >>> int(sol.status) == fw_jax.Status.CONVERGED, sol.status_name
    """

    CONVERGED = 0  #: every unit reached ``gap ≤ tol · error``.
    MAX_ITERATIONS = 1  #: the iteration cap came first (the mask is still valid and checked).
    NONFINITE = 2  #: a non-finite value appeared (in the inputs, under an outer ``jit``, or by
    #: overflow); the mask falls back to the warm start.
    INDEFINITE = 3  #: (under an outer ``jit`` only) the Gram matrix is clearly not PSD.
    #: Outside ``jit`` such a matrix, like a non-finite input, raises ``ValueError``.

    names = {0: "converged", 1: "max_iterations", 2: "nonfinite", 3: "indefinite"}


class LayerSolution(NamedTuple):
    """Result of :func:`solve_layer` (a pytree of arrays).

    Errors are ``‖WX − (M⊙W)X‖²_F`` summed over the layer.

    Example:
      >>> sol = fw_jax.solve_layer(W, G, k)
      >>> sol.mask, float(sol.loss), float(sol.lower_bound), float(sol.certificate)
    """

    mask: Array  #: (d_out, d_in) boolean, meets the budget exactly, contains every fixed entry.
    loss: Array  #: error of ``mask``.
    warm_loss: Array  #: error of the warm-start mask (``loss ≤ warm_loss`` always).
    lower_bound: Array  #: proved: no mask under the budget has an error below this (``-inf``: nothing proved).
    gap: Array  #: Frank-Wolfe gap at the final relaxed iterate (on the polytope with fixed entries); NaN
    #: when nothing is proved (status nonfinite or indefinite).
    relaxed_loss: Array  #: error of the final relaxed iterate.
    relaxed_mask: Array  #: (d_out, d_in) final relaxed iterate in ``[0, 1]``.
    fixed: Array  #: (d_out, d_in) boolean, the entries held at 1 (top ``α·k`` saliency).
    row_loss: Array  #: (d_out,) per-row error of ``mask``.
    iterations: Array  #: Frank-Wolfe iterations (the most any unit took).
    swaps: Array  #: accepted 1-swaps, summed over units.
    status: Array  #: a :class:`Status` code.
    history: Optional[FWHistory]  #: per-iteration totals if ``history=True``.

    @property
    def certificate(self) -> Array:
        """``(loss − lower_bound) / loss``: the returned mask is at most this far (relatively)
        above the best mask under the budget (0: proved optimal; 1: nothing proved). NaN when
        the status is nonfinite or indefinite, where no bound holds, so that nothing claims
        optimality there."""
        proved = (self.status == Status.CONVERGED) | (self.status == Status.MAX_ITERATIONS)
        positive = self.loss > 0
        ratio = jnp.where(positive, (self.loss - self.lower_bound) / jnp.where(positive, self.loss, 1), 0.0)
        return jnp.where(proved, ratio, jnp.nan)

    @property
    def status_name(self) -> str:
        return Status.names[int(self.status)]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static: changing any of it compiles a new solver."""

    budget: Budget
    saliency: str
    options: SolverOptions
    check_psd: bool = False  # in the compiled call: the Gram matrix was traced, not checked before


def _residual_product(weight, gram, mask):
    """``(W ⊙ (1 − M)) G``: the residual's product with the Gram matrix (``M`` binary or relaxed)."""
    return (weight * (1 - mask.astype(weight.dtype))) @ gram


class _Rows(NamedTuple):
    """What :func:`_solve_rows` finds for some rows of a layer (the whole layer, or a chunk of it)."""

    mask: Array
    warm: Array
    fixed: Array
    relaxed: Array
    mask_rows: Array  #: per-row error of ``mask``
    warm_rows: Array  #: per-row error of ``warm``
    lower_bound: Array  #: summed over the units
    gap: Array  #: summed over the units
    relaxed_loss: Array  #: summed over the units
    iterations: Array  #: the most any unit took
    swaps: Array
    converged: Array  #: every unit
    history: Optional[FWHistory]


def _solve_rows(weight, scores, gram, warm_mask, alpha, tol, gram_norm, config: _Config) -> _Rows:
    """Steps 1-5 of the module docstring, and the lower bound, on ``weight``'s rows."""
    budget, options = config.budget, config.options
    dtype = weight.dtype
    warm = budget.round((scores,)) if warm_mask is None else warm_mask
    # Fixed entries: the top ⌊α·k⌋ saliency entries inside the warm mask, per budget unit.
    fixed = budget.round((warm, scores), count=budget.fixed_count(alpha)) & warm

    round_keys = lambda relaxed: (fixed, relaxed, scores)  # noqa: E731
    round_units = None
    if options.history:
        round_units = lambda u: budget.units(budget.round(round_keys(budget.from_units(u)))).astype(dtype)  # noqa: E731
    lmo = budget.oracle(options.lmo_method)
    fw = frank_wolfe(
        budget.units(weight),
        gram,
        budget.units(warm.astype(dtype)),
        budget.units(fixed),
        lmo,
        as_step_rule(options.step_rule),
        max_iter=options.max_iter,
        tol=tol,
        gram_norm=gram_norm,
        refresh_every=options.refresh_every,
        round_units=round_units,
        round_every=options.round_every,
        precision=options.precision,
    )
    relaxed = budget.from_units(fw.relaxed_mask)
    rounded = budget.round(round_keys(relaxed))

    # One product (W ⊙ (1 − M)) G per binary mask, shared by its row errors, the swaps and the bound.
    warm_product, rounded_product = _residual_product(weight, gram, warm), _residual_product(weight, gram, rounded)
    warm_rows = jnp.sum(weight * ~warm * warm_product, axis=-1)
    rounded_rows = jnp.sum(weight * ~rounded * rounded_product, axis=-1)
    better = jnp.reshape(
        budget.rows_of_units(budget.unit_totals(rounded_rows) <= budget.unit_totals(warm_rows)), (-1, 1)
    )
    mask = jnp.where(better, rounded, warm)
    product = jnp.where(better, rounded_product, warm_product)
    swaps = jnp.zeros((), jnp.int32)
    if options.swaps:
        refined = budget.refine(weight, gram, mask, fixed, options.max_swaps, refresh_every=options.refresh_every,
                                product=product)
        mask, swaps, product = refined.mask, jnp.sum(refined.swaps), refined.product
    mask_rows = jnp.sum(weight * ~mask * product, axis=-1)

    # Lower bounds on the unrestricted problem. Frank-Wolfe's own bound is valid only where no
    # entry was fixed; every point of the polytope gives one more (L − gap with the full LMO).
    weight_units = budget.units(weight)
    unit_has_fixed = jnp.any(budget.units(fixed).reshape(fw.loss.shape[0], -1), axis=-1)
    bounds = [
        full_polytope_bound(weight_units, fw.residual, fw.relaxed_mask, lmo),
        full_polytope_bound(weight_units, budget.units(product), budget.units(mask.astype(dtype)), lmo),
        jnp.where(unit_has_fixed, 0, fw.lower_bound),
    ]
    return _Rows(mask=mask, warm=warm, fixed=fixed, relaxed=relaxed, mask_rows=mask_rows, warm_rows=warm_rows,
                 lower_bound=jnp.sum(functools.reduce(jnp.maximum, bounds)), gap=jnp.sum(fw.gap),
                 relaxed_loss=jnp.sum(fw.loss), iterations=jnp.max(fw.iterations), swaps=swaps,
                 converged=jnp.all(fw.converged), history=fw.history)


def _solve_in_chunks(weight, scores, gram, warm_mask, alpha, tol, gram_norm, config: _Config, rows: int) -> _Rows:
    """:func:`_solve_rows` on chunks of ``rows`` rows in turn (one compiled body, ``lax.map``), so
    that every temporary is a chunk's size; the results put back together as one layer's."""
    d_out, d_in = weight.shape
    chunked = lambda x: None if x is None else x.reshape(d_out // rows, rows, d_in)  # noqa: E731
    parts = jax.lax.map(lambda c: _solve_rows(c[0], c[1], gram, c[2], alpha, tol, gram_norm, config),
                        (chunked(weight), chunked(scores), chunked(warm_mask)))
    whole = lambda x: x.reshape(d_out, *x.shape[2:])  # noqa: E731
    return _Rows(mask=whole(parts.mask), warm=whole(parts.warm), fixed=whole(parts.fixed),
                 relaxed=whole(parts.relaxed), mask_rows=whole(parts.mask_rows), warm_rows=whole(parts.warm_rows),
                 lower_bound=jnp.sum(parts.lower_bound), gap=jnp.sum(parts.gap),
                 relaxed_loss=jnp.sum(parts.relaxed_loss), iterations=jnp.max(parts.iterations),
                 swaps=jnp.sum(parts.swaps), converged=jnp.all(parts.converged), history=None)


@functools.partial(jax.jit, static_argnames=("config",))
def _solve(weight, gram, warm_mask, alpha, tol, *, config: _Config) -> LayerSolution:
    budget, options = config.budget, config.options
    step_rule = as_step_rule(options.step_rule)
    dtype = weight.dtype
    gram = (gram + gram.T) / 2
    scores = saliency_scores(config.saliency, weight, gram)  # of the whole layer (RIA's sums run over all rows)
    gram_norm = jnp.linalg.eigvalsh(gram)[-1] if getattr(step_rule, "needs_gram_norm", False) else jnp.ones((), dtype)
    rows = options.rows_per_chunk(*weight.shape) if budget.separable_rows else weight.shape[0]
    if rows < weight.shape[0]:
        found = _solve_in_chunks(weight, scores, gram, warm_mask, alpha, tol, gram_norm, config, rows)
    else:
        found = _solve_rows(weight, scores, gram, warm_mask, alpha, tol, gram_norm, config)

    lower_bound = found.lower_bound
    indefinite = jnp.zeros((), bool)
    if config.check_psd:  # a traced G was not checked by check_layer_inputs: never claim a bound on it
        smallest, largest = negative_curvature(gram)
        indefinite = smallest < -PSD_TOLERANCE * jnp.maximum(largest, 0)
        lower_bound = jnp.where(indefinite, -jnp.inf, lower_bound)

    loss = jnp.sum(found.mask_rows)
    warm_loss = jnp.sum(found.warm_rows)
    # (an indefinite G's "bound" is -inf by design, not a non-finite failure)
    finite = jnp.isfinite(loss) & (jnp.isfinite(lower_bound) | indefinite) & jnp.all(jnp.isfinite(found.relaxed))
    status = jnp.where(
        indefinite,
        Status.INDEFINITE,
        jnp.where(
            ~finite,
            Status.NONFINITE,
            jnp.where(found.converged, Status.CONVERGED, Status.MAX_ITERATIONS),
        ),
    ).astype(jnp.int32)
    proved = finite & ~indefinite  # elsewhere no bound holds: -inf, and NaN gap and certificate
    return LayerSolution(
        mask=jnp.where(finite, found.mask, found.warm),
        loss=jnp.where(finite, loss, warm_loss),
        warm_loss=warm_loss,
        lower_bound=jnp.where(proved, jnp.minimum(lower_bound, loss), -jnp.inf),
        gap=jnp.where(proved, found.gap, jnp.nan),
        relaxed_loss=found.relaxed_loss,
        relaxed_mask=found.relaxed,
        fixed=found.fixed,
        row_loss=jnp.where(finite, found.mask_rows, found.warm_rows),
        iterations=found.iterations,
        swaps=found.swaps,
        status=status,
        history=found.history,
    )


def solve_layer(
    weight: Array,
    gram: Array,
    budget: Union[int, tuple[int, int], str, Budget],
    *,
    warm_start: Union[str, Array] = "wanda",
    alpha: float = 0.0,
    tol: float = 1e-4,
    options: SolverOptions = SolverOptions(),
) -> LayerSolution:
    """Choose the mask of one linear layer by Frank-Wolfe: ``min ‖WX − (M⊙W)X‖²_F``.

    Relaxes the budget to its convex hull, runs Frank-Wolfe from a saliency warm start (rows
    vmapped, one step size each), rounds, and refines by 1-swaps. The returned mask is never
    worse than the warm start, and comes with a proved lower bound on the best possible error.

    Args:
      weight: ``(d_out, d_in)`` float weights (bfloat16/float16 are computed in float32).
      gram: ``(d_in, d_in)`` Gram matrix ``X Xᵀ`` of the layer's calibration inputs.
      budget: ``k`` (int, kept per row), ``PerRow(k)``, ``NM(n, m)`` (n kept of every m; also
        ``(n, m)`` or ``"n:m"``) or ``LayerBudget(K)`` (K kept in total).
      warm_start: ``"magnitude"``, ``"wanda"``, ``"ria"`` or a boolean mask meeting the budget
        exactly. Its saliency (Wanda for a given mask) also orders rounding ties.
      alpha: fraction in ``[0, 1]`` of each unit's budget fixed to the top-saliency weights
        inside the warm mask (0.9 in the paper; 0 is plain Frank-Wolfe; 1 returns the warm
        start, up to swaps). Traced: changing it does not recompile. The default is 0 because
        this function solves the problem it is given; the pipeline's recipe,
        ``fw_jax.pipeline.SparseFW``, fixes 0.9 (its docstring says why).
      tol: a unit stops when its gap ``≤ tol ·`` its relaxed error (traced).
      options: a :class:`SolverOptions` (iteration cap, step rule, swaps, oracle, precision,
        history). Static: other options compile another solver.

    Returns:
      A :class:`LayerSolution`; check ``status`` (``status_name``) for convergence.

    Raises:
      ValueError: on bad input, naming it: shapes, dtypes, budgets, non-finite values, ``alpha``
        outside ``[0, 1]``, ``tol`` not finite or negative, and a Gram matrix that is clearly
        not positive semidefinite (the lower bound is proved only for a PSD one; the message
        gives the smallest eigenvalue found). Under an outer ``jit`` value checks cannot raise:
        an indefinite ``gram`` then gives ``status`` "indefinite" and ``lower_bound = -inf``.

    Example:
      >>> sol = fw_jax.solve_layer(W, G, W.shape[1] // 2)
      >>> float(sol.loss) <= float(sol.warm_loss), float(sol.certificate)
    """
    budget = as_budget(budget)
    weight, gram = check_layer_inputs(weight, gram, budget)
    check_alpha(alpha)
    check_tol(tol)
    if not isinstance(options, SolverOptions):
        raise ValueError(f"options must be a fw_jax.SolverOptions, got {options!r}")
    if isinstance(warm_start, str):
        saliency_scores(warm_start, weight[:1, :1], gram[:1, :1])  # validates the name
        warm_mask, saliency = None, warm_start
    else:
        warm_mask = check_warm_mask(warm_start, weight.shape, budget)
        saliency = "wanda"
    config = _Config(budget=budget, saliency=saliency, options=options, check_psd=not is_concrete(gram))
    return _solve(weight, gram, warm_mask, jnp.asarray(alpha, weight.dtype), jnp.asarray(tol, weight.dtype),
                  config=config)


def mask_lower_bound(weight: Array, gram: Array, budget: Union[int, Budget], *points: Array) -> Array:
    """Proved lower bound on ``‖WX − (M⊙W)X‖²`` over every mask ``M`` under ``budget``.

    Each point ``P`` of the relaxed budget polytope (a relaxed iterate, or any mask meeting the
    budget) gives ``L(P) − gap(P)`` per unit by convexity; the best over the points is kept per
    unit and the units are summed. Use it to certify, on ``G``, a mask chosen for another
    objective (``fw_jax.pipeline`` does so for masks chosen on a shrunk Gram matrix).

    Non-finite or indefinite inputs are refused (``ValueError``); under an outer ``jit``, where
    nothing can raise, they give ``-inf``: no bound.

    Args:
      weight: ``(d_out, d_in)``; gram: ``(d_in, d_in)``; budget: as in :func:`solve_layer`.
      points: one or more ``(d_out, d_in)`` arrays with entries in ``[0, 1]`` meeting the budget
        (``≤ k`` per unit); boolean masks are accepted.

    Example:
      >>> mask = fw_jax.wanda_mask(W, G, k)
      >>> fw_jax.mask_lower_bound(W, G, k, mask)  # no mask keeping k per row does better
    """
    budget = as_budget(budget)
    weight, gram = check_layer_inputs(weight, gram, budget)
    if not points:
        raise ValueError("mask_lower_bound needs at least one point of the budget polytope")
    for p in points:
        if jnp.shape(p) != weight.shape:
            raise ValueError(f"each point must have the weight's shape {weight.shape}; got {jnp.shape(p)}")
    return _mask_lower_bound(weight, gram, tuple(jnp.asarray(p, weight.dtype) for p in points), budget=budget,
                             check_psd=not is_concrete(gram))


@functools.partial(jax.jit, static_argnames=("budget", "check_psd"))
def _mask_lower_bound(weight, gram, points, *, budget, check_psd=False):
    gram = (gram + gram.T) / 2
    lmo = budget.oracle()
    units = budget.units(weight)
    bounds = [full_polytope_bound(units, budget.units(_residual_product(weight, gram, p)), budget.units(p), lmo)
              for p in points]
    bound = jnp.sum(functools.reduce(jnp.maximum, bounds))
    proved = jnp.isfinite(bound)
    if check_psd:  # a traced G was not checked by check_layer_inputs
        smallest, largest = negative_curvature(gram)
        proved &= ~(smallest < -PSD_TOLERANCE * jnp.maximum(largest, 0))
    return jnp.where(proved, bound, -jnp.inf)
