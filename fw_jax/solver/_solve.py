"""``solve_layer``: the whole mask problem of one linear layer in one compiled call.

Pipeline (DESIGN.md §3-§6):

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
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fw_jax.solver._budgets import NM, Budget, LayerBudget, as_budget
from fw_jax.solver._frank_wolfe import PRECISIONS, FWHistory, frank_wolfe, full_polytope_bound
from fw_jax.solver._lmo import NMLMO, TopKLMO
from fw_jax.solver._objective import row_errors
from fw_jax.solver._psd import PSD_TOLERANCE, negative_curvature
from fw_jax.solver._rounding import round_to_budget
from fw_jax.solver._saliency import saliency_scores
from fw_jax.solver._steps import ShortStep, as_step_rule
from fw_jax.solver._swaps import swap_refine
from fw_jax.solver._validation import check_alpha, check_layer_inputs, check_tol, check_warm_mask

__all__ = ["Status", "LayerSolution", "mask_lower_bound", "solve_layer", "trace_count"]


class Status:
    """Integer status codes of :class:`LayerSolution` (arrays, so they survive ``jit``)."""

    CONVERGED = 0  #: every unit reached ``gap ≤ tol · error``.
    MAX_ITERATIONS = 1  #: the iteration cap came first (the mask is still valid and checked).
    NONFINITE = 2  #: a non-finite value appeared; the mask falls back to the warm start.
    INDEFINITE = 3  #: (under an outer ``jit`` only) the Gram matrix is clearly not PSD: no bound
    #: is proved (``lower_bound = -inf``). Outside ``jit`` such a matrix raises ``ValueError``.

    names = {0: "converged", 1: "max_iterations", 2: "nonfinite", 3: "indefinite"}


class LayerSolution(NamedTuple):
    """Result of :func:`solve_layer` (a pytree of arrays).

    Errors are ``‖WX − (M⊙W)X‖²_F`` summed over the layer.
    """

    mask: Array  #: (d_out, d_in) boolean, meets the budget exactly, contains every fixed entry.
    loss: Array  #: error of ``mask``.
    warm_loss: Array  #: error of the warm-start mask (``loss ≤ warm_loss`` always).
    lower_bound: Array  #: proved: no mask under the budget has an error below this.
    gap: Array  #: Frank-Wolfe gap at the final relaxed iterate (on the polytope with fixed entries).
    relaxed_loss: Array  #: error of the final relaxed iterate.
    relaxed_mask: Array  #: (d_out, d_in) final relaxed iterate in ``[0, 1]``.
    fixed: Array  #: (d_out, d_in) boolean, the entries held at 1 (top ``α·k`` saliency).
    row_loss: Array  #: (d_out,) per-row error of ``mask``.
    iterations: Array  #: Frank-Wolfe iterations (the most any unit took).
    swaps: Array  #: accepted 1-swaps, summed over units.
    sparse_updates: Array  #: iterations whose product was updated incrementally (``product="incremental"``).
    status: Array  #: a :class:`Status` code.
    history: Optional[FWHistory]  #: per-iteration totals if ``history=True``.

    @property
    def certificate(self) -> Array:
        """``(loss − lower_bound) / loss``: the returned mask is at most this far (relatively)
        above the best mask under the budget."""
        return jnp.where(self.loss > 0, (self.loss - self.lower_bound) / self.loss, 0.0)

    @property
    def status_name(self) -> str:
        return Status.names[int(self.status)]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static: changing any of it compiles a new solver."""

    budget: Budget
    saliency: str
    step_rule: Any
    lmo_method: str
    max_iter: int
    refresh_every: int
    swaps: bool
    max_swaps: int
    history: bool
    pairwise: bool
    max_changes: Optional[int]
    precision: str
    check_psd: bool = False  # in the compiled call: the Gram matrix was traced, not checked before


_TRACES = [0]


def trace_count() -> int:
    """How many times the solver has been traced (compiled) in this process (for tests)."""
    return _TRACES[0]


def _units(x: Array, budget: Budget) -> Array:
    return x[None] if isinstance(budget, LayerBudget) else x


def _from_units(x: Array, budget: Budget) -> Array:
    return x[0] if isinstance(budget, LayerBudget) else x


def _lmo_for(budget: Budget, method: str, exact: bool = False):
    if isinstance(budget, NM):
        return NMLMO(budget.n, budget.m, exact)
    return TopKLMO(budget.k, method, exact)


def _fixed_count(budget: Budget, alpha: Array) -> Array:
    per_unit = budget.n if isinstance(budget, NM) else budget.k
    return jnp.floor(alpha * per_unit + 1e-9).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _solve(weight, gram, warm_mask, alpha, tol, *, config: _Config) -> LayerSolution:
    _TRACES[0] += 1
    budget = config.budget
    dtype = weight.dtype
    gram = (gram + gram.T) / 2
    scores = saliency_scores(config.saliency, weight, gram)
    if warm_mask is None:
        warm = round_to_budget((scores,), budget)
    else:
        warm = warm_mask
    # Fixed entries: the top ⌊α·k⌋ saliency entries inside the warm mask, per budget unit.
    fixed = round_to_budget((warm, scores), budget, count=_fixed_count(budget, alpha)) & warm

    gram_norm = (
        jnp.linalg.eigvalsh(gram)[-1] if isinstance(config.step_rule, ShortStep) else jnp.ones((), dtype)
    )
    round_keys = lambda relaxed: (fixed, relaxed, scores)  # noqa: E731
    round_units = None
    if config.history:
        round_units = lambda u: _units(  # noqa: E731
            round_to_budget(round_keys(_from_units(u, budget)), budget), budget
        ).astype(dtype)
    lmo = _lmo_for(budget, config.lmo_method)
    fw = frank_wolfe(
        _units(weight, budget),
        gram,
        _units(warm.astype(dtype), budget),
        _units(fixed, budget),
        _lmo_for(budget, config.lmo_method, exact=config.pairwise),
        config.step_rule,
        max_iter=config.max_iter,
        tol=tol,
        gram_norm=gram_norm,
        refresh_every=config.refresh_every,
        pairwise=config.pairwise,
        round_units=round_units,
        max_changes=config.max_changes,
        precision=config.precision,
    )
    relaxed = _from_units(fw.relaxed_mask, budget)
    rounded = round_to_budget(round_keys(relaxed), budget)

    warm_rows = row_errors(weight, gram, warm)
    rounded_rows = row_errors(weight, gram, rounded)
    if isinstance(budget, LayerBudget):
        better = jnp.sum(rounded_rows) <= jnp.sum(warm_rows)
        mask = jnp.where(better, rounded, warm)
    else:
        mask = jnp.where((rounded_rows <= warm_rows)[:, None], rounded, warm)
    swaps = jnp.zeros((), jnp.int32)
    if config.swaps:
        refined = swap_refine(weight, gram, mask, budget, frozen=fixed, max_swaps=config.max_swaps)
        mask, swaps = refined.mask, jnp.sum(refined.swaps)
    mask_rows = row_errors(weight, gram, mask)

    # Lower bounds on the unrestricted problem. Frank-Wolfe's own bound is valid only where no
    # entry was fixed; every point of the polytope gives one more (L − gap with the full LMO).
    full_lmo_units = _units(weight, budget)
    bounds = [
        full_polytope_bound(full_lmo_units, gram, fw.relaxed_mask, lmo),
        full_polytope_bound(full_lmo_units, gram, _units(mask.astype(dtype), budget), lmo),
    ]
    unit_has_fixed = jnp.any(_units(fixed, budget).reshape(fw.loss.shape[0], -1), axis=-1)
    if not config.pairwise:  # FW's running bound is over the same ≤-budget polytope
        bounds.append(jnp.where(unit_has_fixed, 0, fw.lower_bound))
    lower_bound = jnp.sum(functools.reduce(jnp.maximum, bounds))
    indefinite = jnp.zeros((), bool)
    if config.check_psd:  # a traced G was not checked by check_layer_inputs: never claim a bound on it
        smallest, largest = negative_curvature(gram)
        indefinite = smallest < -PSD_TOLERANCE * jnp.maximum(largest, 0)
        lower_bound = jnp.where(indefinite, -jnp.inf, lower_bound)

    loss = jnp.sum(mask_rows)
    warm_loss = jnp.sum(warm_rows)
    # (an indefinite G's "bound" is -inf by design, not a non-finite failure)
    finite = jnp.isfinite(loss) & (jnp.isfinite(lower_bound) | indefinite) & jnp.all(jnp.isfinite(relaxed))
    status = jnp.where(
        indefinite,
        Status.INDEFINITE,
        jnp.where(
            ~finite,
            Status.NONFINITE,
            jnp.where(jnp.all(fw.converged), Status.CONVERGED, Status.MAX_ITERATIONS),
        ),
    ).astype(jnp.int32)
    mask = jnp.where(finite, mask, warm)
    return LayerSolution(
        mask=mask,
        loss=jnp.where(finite, loss, warm_loss),
        warm_loss=warm_loss,
        lower_bound=jnp.minimum(lower_bound, jnp.where(finite, loss, warm_loss)),
        gap=jnp.sum(fw.gap),
        relaxed_loss=jnp.sum(fw.loss),
        relaxed_mask=relaxed,
        fixed=fixed,
        row_loss=jnp.where(finite, mask_rows, warm_rows),
        iterations=jnp.max(fw.iterations),
        swaps=swaps,
        sparse_updates=fw.sparse_updates,
        status=status,
        history=fw.history,
    )


def solve_layer(
    weight: Array,
    gram: Array,
    budget: Union[int, Budget],
    *,
    warm_start: Union[str, Array] = "wanda",
    alpha: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-4,
    step_rule: Any = "exact",
    swaps: bool = True,
    max_swaps: int = 512,
    lmo_method: str = "search",
    refresh_every: int = 64,
    pairwise: bool = False,
    product: str = "dense",
    max_changes: Optional[int] = None,
    precision: str = "default",
    history: bool = False,
    throw: bool = False,
) -> LayerSolution:
    """Choose the mask of one linear layer by Frank-Wolfe: ``min ‖WX − (M⊙W)X‖²_F``.

    Relaxes the budget to its convex hull, runs Frank-Wolfe from a saliency warm start (rows
    vmapped, one step size each), rounds, and refines by 1-swaps. The returned mask is never
    worse than the warm start, and comes with a proved lower bound on the best possible error.

    Args:
      weight: ``(d_out, d_in)`` float weights (bfloat16/float16 are computed in float32).
      gram: ``(d_in, d_in)`` Gram matrix ``X Xᵀ`` of the layer's calibration inputs.
      budget: ``k`` (int, kept per row), ``PerRow(k)``, ``NM(n, m)`` (n kept of every m) or
        ``LayerBudget(K)`` (K kept in total).
      warm_start: ``"magnitude"``, ``"wanda"``, ``"ria"`` or a boolean mask meeting the budget
        exactly. Its saliency (Wanda for a given mask) also orders rounding ties.
      alpha: fraction in ``[0, 1]`` of each unit's budget fixed to the top-saliency weights
        inside the warm mask (0.9 in the paper; 0 is plain Frank-Wolfe; 1 returns the warm
        start, up to swaps). Traced: changing it does not recompile.
      max_iter: Frank-Wolfe iteration cap (static).
      tol: a unit stops when its gap ``≤ tol ·`` its relaxed error (traced).
      step_rule: ``"exact"`` (line search, default), ``"open_loop"`` (``2/(t+2)``, as
        published) or ``"short"``; or a rule object from ``fw_jax.solver``.
      swaps: refine the rounded mask by 1-swaps (DESIGN.md §6).
      max_swaps: cap on swap steps (each step swaps at most once per unit).
      lmo_method: ``"search"`` (default: interpolation + bisection on the float bits, the
        fastest measured on CPU, ``results/variants.md``), ``"bisect"`` or ``"top_k"``; same
        vertices.
      refresh_every: dense recomputation period of the running product.
      pairwise: pairwise Frank-Wolfe steps (toward the FW vertex, away from the away vertex,
        in decomposition-invariant form) on the hull of masks keeping exactly the budget;
        ``False`` gives vanilla Frank-Wolfe on the ``≤`` budget polytope, as published.
      product: ``"dense"`` (one GEMM per iteration) or ``"incremental"``: update ``(W⊙V)G``
        from the entries where the vertex changed (a gather of rows of ``G``), falling back to
        the dense product when some row changes in more than ``max_changes`` entries. Same
        iterates up to float rounding; vanilla steps only.
      max_changes: per-row cap of the incremental update (default ``d_in // 16``).
      precision: of the iteration's products: ``"default"`` (JAX's: full float32 on CPU, TF32
        on recent GPUs), ``"highest"`` or ``"bfloat16"`` (bfloat16 inputs, float32 sums).
        Only the loop uses it: the errors, swaps and lower bound never use bfloat16 products.
      history: record per-iteration relaxed error, rounded error and gap (costs a rounding and
        a GEMM per iteration; for plots).
      throw: raise ``RuntimeError`` unless the status is ``converged``.

    Returns:
      A :class:`LayerSolution`.

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
    step = as_step_rule(step_rule)
    for name, value in (("max_iter", max_iter), ("max_swaps", max_swaps), ("refresh_every", refresh_every)):
        if not isinstance(value, (int, np.integer)) or value < (1 if name == "refresh_every" else 0):
            raise ValueError(f"{name} must be a non-negative int (refresh_every ≥ 1), got {value!r}")
    if lmo_method not in ("bisect", "search", "top_k"):
        raise ValueError(f"lmo_method must be 'bisect', 'search' or 'top_k', got {lmo_method!r}")
    if product not in ("dense", "incremental"):
        raise ValueError(f"product must be 'dense' or 'incremental', got {product!r}")
    if product == "incremental" and pairwise:
        raise ValueError("product='incremental' supports vanilla steps only; use pairwise=False")
    if max_changes is not None and (not isinstance(max_changes, (int, np.integer)) or max_changes < 1):
        raise ValueError(f"max_changes must be a positive int or None, got {max_changes!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(warm_start, str):
        saliency_scores(warm_start, weight[:1, :1], gram[:1, :1])  # validates the name
        warm_mask, saliency = None, warm_start
    else:
        warm_mask = check_warm_mask(warm_start, weight.shape, budget)
        saliency = "wanda"
    config = _Config(
        budget=budget,
        saliency=saliency,
        step_rule=step,
        lmo_method=lmo_method,
        max_iter=int(max_iter),
        refresh_every=int(refresh_every),
        swaps=bool(swaps),
        max_swaps=int(max_swaps),
        history=bool(history),
        pairwise=bool(pairwise),
        max_changes=None if product == "dense" else int(max_changes or max(1, weight.shape[1] // 16)),
        precision=precision,
        check_psd=isinstance(gram, jax.core.Tracer),
    )
    solution = _solve(
        weight,
        gram,
        warm_mask,
        jnp.asarray(alpha, weight.dtype),
        jnp.asarray(tol, weight.dtype),
        config=config,
    )
    if throw and not isinstance(solution.status, jax.core.Tracer):
        if int(solution.status) != Status.CONVERGED:
            raise RuntimeError(
                f"solve_layer did not converge: status {solution.status_name}, gap "
                f"{float(solution.gap):.3e} after {int(solution.iterations)} iterations"
            )
    return solution


def mask_lower_bound(weight: Array, gram: Array, budget: Union[int, Budget], *points: Array) -> Array:
    """Proved lower bound on ``‖WX − (M⊙W)X‖²`` over every mask ``M`` under ``budget``.

    Each point ``P`` of the relaxed budget polytope (a relaxed iterate, or any mask meeting the
    budget) gives ``L(P) − gap(P)`` per unit by convexity; the best over the points is kept per
    unit and the units are summed. Use it to certify, on ``G``, a mask chosen for another
    objective (``fw_jax.pipeline`` does so for masks chosen on a shrunk Gram matrix).

    Args:
      weight: ``(d_out, d_in)``; gram: ``(d_in, d_in)``; budget: as in :func:`solve_layer`.
      points: one or more ``(d_out, d_in)`` arrays with entries in ``[0, 1]`` meeting the budget
        (``≤ k`` per unit); boolean masks are accepted.
    """
    budget = as_budget(budget)
    weight, gram = check_layer_inputs(weight, gram, budget)
    if not points:
        raise ValueError("mask_lower_bound needs at least one point of the budget polytope")
    for p in points:
        if jnp.shape(p) != weight.shape:
            raise ValueError(f"each point must have the weight's shape {weight.shape}; got {jnp.shape(p)}")
    return _mask_lower_bound(weight, gram, tuple(jnp.asarray(p, weight.dtype) for p in points), budget=budget)


@functools.partial(jax.jit, static_argnames=("budget",))
def _mask_lower_bound(weight, gram, points, *, budget):
    gram = (gram + gram.T) / 2
    lmo = _lmo_for(budget, "search")
    units = _units(weight, budget)
    bounds = [full_polytope_bound(units, gram, _units(p, budget), lmo) for p in points]
    return jnp.sum(functools.reduce(jnp.maximum, bounds))
