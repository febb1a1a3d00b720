"""The Frank-Wolfe loop over a stack of budget units.

Minimises the layer error ``L(M) = Σ_u tr(R_u G R_uᵀ)``, ``R_u = W_u ⊙ (1 − M_u)``, over the
relaxed polytope of every unit ``u`` (an LMO per unit), one matrix product per iteration:

    P = (W ⊙ M) G                    kept across iterations
    RG = W G − P,    ∇L = −2 W ⊙ RG
    V = LMO(∇L)                      one vertex per unit
    Q = (W ⊙ V) G                    the iteration's GEMM
    gap = 2 ⟨W ⊙ (V − M), RG⟩,  curvature = ⟨W ⊙ (V − M), Q − P⟩
    η = step_rule(...)               one step size per unit
    M ← M + η (V − M),   P ← P + η (Q − P)

Units are rows for per-row and n:m budgets (each row has its own step size and stops on its
own: its flag lives in the loop carry) and the whole matrix for a layer budget. ``P`` is
recomputed densely every ``refresh_every`` iterations to bound the drift of the running update.

Convexity gives at every iterate ``L(M_t) − gap_t ≤ min_C L`` (docs/design.md §11): the loop
keeps the best such bound per unit.

The oracle is called through its protocol (``_lmo.py``): ``state = lmo.init(units, dtype)``
once, then ``vertex, state = lmo(gradient, fixed, state)`` every iteration, the state carried in
the loop. :func:`pairwise_frank_wolfe` is the same loop with pairwise steps (toward the FW vertex
and away from ``lmo.away(...)``); ``solve_layer`` does not use it (never measured to help here).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
from jax import Array, lax

from fw_jax.solver._lmo import Oracle, vertices
from fw_jax.solver._steps import StepInfo

__all__ = ["FWHistory", "FWResult", "frank_wolfe", "pairwise_frank_wolfe"]


class FWHistory(NamedTuple):
    """Per-iteration totals over the layer (entries past the last iteration are NaN)."""

    relaxed_loss: Array  #: (max_iter,) L(M_t).
    rounded_loss: Array  #: (max_iter,) error of the rounded M_t.
    gap: Array  #: (max_iter,) Frank-Wolfe gap at M_t.


class FWResult(NamedTuple):
    relaxed_mask: Array  #: (units, *unit_shape) final iterate.
    loss: Array  #: (units,) L at the final iterate.
    gap: Array  #: (units,) gap at the final iterate, on the polytope with fixed entries.
    lower_bound: Array  #: (units,) proved lower bound on min L over the restricted polytope.
    iterations: Array  #: (units,) iterations taken by each unit.
    converged: Array  #: (units,) gap ≤ tol · loss reached.
    history: Optional[FWHistory]
    residual: Array  #: (units, *unit_shape) ``(W ⊙ (1 − M)) G`` at the final iterate, from a fresh product.


class _State(NamedTuple):
    iteration: Array
    mask: Array
    product: Array
    lmo_state: Any  # the oracle's state (threshold oracles: their last thresholds)
    lower_bound: Array
    iterations: Array
    done: Array
    history: Optional[FWHistory]


PRECISIONS = ("default", "highest", "bfloat16")


def gram_matmul(x: Array, gram: Array, precision: str = "default") -> Array:
    """``x @ gram`` in the loop's precision: ``"default"`` (JAX's default for the dtype: full
    float32 on CPU, TF32 on recent GPUs), ``"highest"`` (full float32 everywhere) or
    ``"bfloat16"`` (bfloat16 inputs, float32 accumulation). The result has ``x``'s dtype."""
    if precision == "bfloat16":
        out = jnp.matmul(x.astype(jnp.bfloat16), gram.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return out.astype(x.dtype)
    return jnp.matmul(x, gram, precision=lax.Precision.HIGHEST if precision == "highest" else None)


def unit_sum(x: Array) -> Array:
    """Sum over everything but the leading unit axis."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _loop(
    weight: Array,
    gram: Array,
    init_mask: Array,
    fixed: Array,
    lmo: Oracle,
    step_rule: Callable[[StepInfo], Array],
    *,
    max_iter: int,
    tol: Array,
    gram_norm: Array,
    refresh_every: int = 64,
    pairwise: bool = False,
    round_units: Optional[Callable[[Array], Array]] = None,
    round_every: int = 1,
    precision: str = "default",
) -> FWResult:
    """The loop behind :func:`frank_wolfe` and :func:`pairwise_frank_wolfe`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if pairwise and not lmo.exact:
        raise ValueError("pairwise steps need an exact (hypersimplex) oracle, e.g. TopKLMO(k, exact=True)")
    dtype = weight.dtype
    units = weight.shape[0]
    snap = 32 * jnp.finfo(dtype).eps
    target = gram_matmul(weight, gram, precision)  # H = W G

    def product_of(mask, precision=precision):
        return gram_matmul(weight * mask, gram, precision)

    def loss_and_rg(mask, product):
        rg = target - product
        return unit_sum(weight * (1 - mask) * rg), rg

    history = None
    if round_units is not None:
        nan = jnp.full((max_iter,), jnp.nan, dtype)
        history = FWHistory(nan, nan, nan)

    def cond(state: _State):
        return (state.iteration < max_iter) & ~jnp.all(state.done)

    def body(state: _State) -> _State:
        t = state.iteration
        mask = state.mask
        refresh = (t > 0) & (t % refresh_every == 0)
        product = lax.cond(refresh, lambda: product_of(mask), lambda: state.product)
        loss, rg = loss_and_rg(mask, product)
        gradient = -2 * weight * rg
        vertex, lmo_state = lmo(gradient, fixed, state.lmo_state)
        gap = 2 * unit_sum(weight * (vertex - mask) * rg)
        if pairwise:
            direction = vertex - lmo.away(gradient, mask, fixed)
            room = jnp.where(direction < 0, mask, jnp.where(direction > 0, 1 - mask, jnp.inf))
            max_step = jnp.min(room.reshape(units, -1), axis=-1)
        else:
            direction = vertex - mask
            max_step = jnp.ones((units,), dtype)
        step_weights = weight * direction
        slope = unit_sum(step_weights * rg) if pairwise else gap / 2
        direction_product = gram_matmul(step_weights, gram, precision)
        curvature = unit_sum(step_weights * direction_product)
        done = state.done | (gap <= tol * loss)
        info = StepInfo(
            iteration=t.astype(dtype),
            slope=slope,
            curvature=curvature,
            direction_sq_norm=unit_sum(step_weights**2),
            gram_norm=gram_norm,
        )
        eta = jnp.where(done, 0, jnp.minimum(step_rule(info), max_step)).astype(dtype)
        eta_b = eta.reshape((units,) + (1,) * (weight.ndim - 1))
        new_history = state.history
        if history is not None:
            def rounded_loss():
                rounded = round_units(mask)
                return jnp.sum(loss_and_rg(rounded, product_of(rounded))[0])

            rounded_loss = lax.cond(t % round_every == 0, rounded_loss, lambda: jnp.full((), jnp.nan, dtype))
            new_history = FWHistory(
                state.history.relaxed_loss.at[t].set(jnp.sum(loss)),
                state.history.rounded_loss.at[t].set(rounded_loss),
                state.history.gap.at[t].set(jnp.sum(gap)),
            )
        new_mask = mask + eta_b * direction
        if pairwise:  # land exactly on the faces that the capped step reaches
            new_mask = jnp.clip(jnp.where(jnp.abs(new_mask - jnp.round(new_mask)) < snap, jnp.round(new_mask), new_mask), 0, 1)
        return _State(
            iteration=t + 1,
            mask=new_mask,
            product=product + eta_b * direction_product,
            lmo_state=lmo_state,
            lower_bound=jnp.maximum(state.lower_bound, loss - gap),
            iterations=state.iterations + (~done).astype(jnp.int32),
            done=done,
            history=new_history,
        )

    init = _State(
        iteration=jnp.array(0, jnp.int32),
        mask=init_mask.astype(dtype),
        product=product_of(init_mask.astype(dtype)),
        lmo_state=lmo.init(units, dtype),
        lower_bound=jnp.full((units,), -jnp.inf, dtype),
        iterations=jnp.zeros((units,), jnp.int32),
        done=jnp.zeros((units,), bool),
        history=history,
    )
    state = lax.while_loop(cond, body, init)

    # Recompute the certificate once at the final iterate, from a fresh product (no drift).
    mask = state.mask
    if precision == "default":
        rg = target - product_of(mask)
    else:  # the bound must not inherit the loop's rounding
        rg = gram_matmul(weight, gram, "highest") - product_of(mask, "highest")
    loss = unit_sum(weight * (1 - mask) * rg)
    vertex = vertices(lmo, -2 * weight * rg, fixed)
    gap = 2 * unit_sum(weight * (vertex - mask) * rg)
    running = state.lower_bound if precision != "bfloat16" else -jnp.inf  # too coarse to prove anything
    lower_bound = jnp.maximum(jnp.maximum(running, loss - gap), 0)
    return FWResult(
        relaxed_mask=mask,
        loss=loss,
        gap=gap,
        lower_bound=lower_bound,
        iterations=state.iterations,
        converged=gap <= tol * loss,
        history=state.history,
        residual=rg,
    )


def frank_wolfe(weight: Array, gram: Array, init_mask: Array, fixed: Array, lmo: Oracle,
                step_rule: Callable[[StepInfo], Array], **options) -> FWResult:
    """Run Frank-Wolfe on every unit of ``weight`` at once (traceable; jit the caller).

    Args:
      weight: ``(units, *unit_shape)``, last axis ``d_in``.
      gram: ``(d_in, d_in)`` symmetric PSD.
      init_mask: start point in the polytope, like ``weight``.
      fixed: boolean like ``weight``; entries held at 1 (they must be 1 in ``init_mask``).
      lmo: an oracle (``_lmo.Oracle``) over the stack of units; its state is carried from one
        iteration to the next.
      step_rule: ``StepInfo -> η`` per unit.

    Keyword Args:
      max_iter: static iteration cap.
      tol: relative gap tolerance: a unit stops once ``gap ≤ tol · L``.
      gram_norm: largest eigenvalue of ``gram`` (for the short step).
      refresh_every: static; dense recomputation period of ``P``.
      round_units: if given, also record the per-iteration error of the rounded iterate
        (costs a rounding and a GEMM per iteration: for plots only).
      round_every: static; record the rounded error only every this many iterations (NaN
        between; the relaxed error and the gap cost nothing and are always recorded).
      precision: static; precision of the iteration's matrix products (see
        :func:`gram_matmul`). The final certificate is always recomputed at ``"highest"``.

    Returns:
      An :class:`FWResult`.
    """
    return _loop(weight, gram, init_mask, fixed, lmo, step_rule, pairwise=False, **options)


def pairwise_frank_wolfe(weight: Array, gram: Array, init_mask: Array, fixed: Array, lmo: Oracle,
                         step_rule: Callable[[StepInfo], Array], **options) -> FWResult:
    """:func:`frank_wolfe` with pairwise steps: the direction is ``V − A``, toward the FW vertex
    and away from the away vertex ``A = lmo.away(...)`` (decomposition-invariant: no active set),
    the step capped so the iterate stays in the polytope. The polytope is the hull of masks
    keeping exactly the budget, so ``lmo`` must be an ``exact`` oracle (``TopKLMO(k,
    exact=True)``) and ``init_mask`` must keep exactly the budget; the lower bound is over that
    polytope. Same arguments as :func:`frank_wolfe`."""
    return _loop(weight, gram, init_mask, fixed, lmo, step_rule, pairwise=True, **options)

def full_polytope_bound(weight: Array, rg: Array, mask: Array, lmo) -> Array:
    """Lower bound ``L(M) − gap(M)`` on the error of every mask in the *unrestricted* budget
    polytope (no fixed entries), at a point ``M`` of that polytope, from ``rg = (W ⊙ (1 − M)) G``
    (the caller usually has it already). Per unit, clipped at 0."""
    vertex = vertices(lmo, -2 * weight * rg, jnp.zeros(weight.shape, bool))
    loss = unit_sum(weight * (1 - mask) * rg)
    gap = 2 * unit_sum(weight * (vertex - mask) * rg)
    return jnp.maximum(loss - gap, 0)
