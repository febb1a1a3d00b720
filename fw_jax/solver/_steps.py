"""Step-size rules for the Frank-Wolfe update ``M ← M + η (V − M)``.

Along the direction ``D = V − M`` of one budget unit, with ``E = W ⊙ D`` and residual
``R = W ⊙ (1 − M)``, the layer error is the exact quadratic

    L(M + η D) = L(M) − 2 η ⟨E, R G⟩ + η² ⟨E, E G⟩,

so a rule sees ``slope = ⟨E, RG⟩`` (half the Frank-Wolfe gap) and ``curvature = ⟨E, EG⟩``,
both of which the loop has without an extra matrix product. Rules are frozen dataclasses with
one method, ``__call__(info) -> η``; a rule that reads ``info.gram_norm`` sets
``needs_gram_norm`` (the solver then computes λ_max(G), else it passes 1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
from jax import Array

__all__ = ["STEP_RULES", "StepInfo", "OpenLoop", "ExactLineSearch", "ShortStep", "as_step_rule"]


class StepInfo(NamedTuple):
    """What a step rule may look at, per budget unit."""

    iteration: Array  #: 0-based iteration count (scalar).
    slope: Array  #: ⟨E, RG⟩ = gap / 2 ≥ 0.
    curvature: Array  #: ⟨E, EG⟩ ≥ 0.
    direction_sq_norm: Array  #: ‖E‖².
    gram_norm: Array  #: largest eigenvalue of G (scalar).


@dataclasses.dataclass(frozen=True)
class OpenLoop:
    """The published open-loop rule ``η_t = 2 / (t + 2)``, ``t = 0, 1, ...``.

    Example:
      >>> fw_jax.solve_layer(W, G, k, options=fw_jax.SolverOptions(step_rule=fw_jax.OpenLoop()))
    """

    needs_gram_norm: ClassVar[bool] = False

    def __call__(self, info: StepInfo) -> Array:
        eta = 2.0 / (info.iteration + 2.0)
        return jnp.broadcast_to(eta, info.slope.shape).astype(info.slope.dtype)


@dataclasses.dataclass(frozen=True)
class ExactLineSearch:
    """Exact minimiser of the quadratic along ``D``: ``η = clip(slope / curvature, 0, 1)``.

    When the curvature vanishes the error is linear along ``D`` and decreasing (slope ≥ 0), so
    the full step is taken.

    Example:
      >>> fw_jax.solve_layer(W, G, k, options=fw_jax.SolverOptions(step_rule=fw_jax.ExactLineSearch()))
    """

    needs_gram_norm: ClassVar[bool] = False

    def __call__(self, info: StepInfo) -> Array:
        safe = jnp.where(info.curvature > 0, info.curvature, 1.0)
        eta = jnp.where(info.curvature > 0, info.slope / safe, 1.0)
        return jnp.clip(eta, 0.0, 1.0) * (info.slope > 0)


@dataclasses.dataclass(frozen=True)
class ShortStep:
    """Short step ``η = clip(slope / (λ_max(G) ‖E‖²), 0, 1)``.

    Minimises the quadratic upper bound ``curvature ≤ λ_max(G) ‖E‖²``; needs no curvature, only
    the smoothness constant, and never overshoots.

    Example:
      >>> fw_jax.solve_layer(W, G, k, options=fw_jax.SolverOptions(step_rule=fw_jax.ShortStep()))
    """

    needs_gram_norm: ClassVar[bool] = True

    def __call__(self, info: StepInfo) -> Array:
        bound = info.gram_norm * info.direction_sq_norm
        safe = jnp.where(bound > 0, bound, 1.0)
        eta = jnp.where(bound > 0, info.slope / safe, 1.0)
        return jnp.clip(eta, 0.0, 1.0) * (info.slope > 0)


STEP_RULES = {"exact": ExactLineSearch, "open_loop": OpenLoop, "short": ShortStep}  #: the rules by name


def as_step_rule(rule) -> object:
    """Accept ``"open_loop"``, ``"exact"``, ``"short"`` or a rule object."""
    if isinstance(rule, str):
        if rule not in STEP_RULES:
            raise ValueError(f"step rule must be one of {', '.join(STEP_RULES)} or a rule object, got {rule!r}")
        return STEP_RULES[rule]()
    if not callable(rule):
        raise ValueError(f"step rule must be a name or a callable rule object, got {rule!r}")
    return rule
