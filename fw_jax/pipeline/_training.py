"""What block-wise recovery (``recover.py``) and fine-tuning (``finetune.py``) share: the
training loop (:func:`train_masked`: masked steps, held-out evaluations keeping the best weights,
early and non-finite stops), the masked optax update that keeps pruned entries exactly 0, the
choice of the weights trained, and the checks of their settings."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fw_jax._checks import check_int, check_number


class Trained(NamedTuple):
    """Where :func:`train_masked` stands (after a step, or at the end)."""

    weights: Any  #: the latest weights (a pytree)
    opt_state: Any  #: the optimizer's state for them
    best: Any  #: the weights of the lowest held-out loss so far (those given when no step beat them)
    best_loss: float  #: their held-out loss
    best_step: int  #: the step they are from (0, or the ``best_step`` given, when no step beat them)
    steps: int  #: steps taken, counting those before ``start``
    stopped: str  #: ``"steps"`` (all taken), ``"early"`` (patience ran out) or ``"nonfinite"``


class StepEvent(NamedTuple):
    """What :func:`train_masked` tells ``on_step`` after each step."""

    step: int  #: the step just taken, counted from 1
    loss: float  #: its training loss
    held: Optional[float]  #: the held-out loss measured after it, or ``None`` (not an evaluation step)
    stopping: Optional[str]  #: ``"early"`` or ``"nonfinite"`` when this is the last step, else ``None``
    state: Trained  #: the state after it


def train_masked(step: Callable, weights, opt_state, batches: Callable, *, steps: int, eval_every: int,
                 held_loss: Callable, best, best_loss: float, best_step: int = 0, start: int = 0,
                 patience: Optional[int] = None, on_step: Optional[Callable] = None) -> Trained:
    """Steps ``start + 1 .. steps`` of a masked training run, keeping the weights of the best held-out loss.

    Each step is ``weights, opt_state, loss = step(weights, opt_state, *batches(t))`` (``t`` from
    ``start``; ``step`` may donate its inputs). A non-finite training loss stops the run
    (``"nonfinite"``) before any evaluation. Every ``eval_every`` steps and after the last one,
    ``held_loss(weights)`` is measured: non-finite, the run stops (``"nonfinite"``); lower than
    ``best_loss``, a copy of the weights becomes ``best``; otherwise, with ``patience``, that many
    evaluations in a row without a lower loss stop the run (``"early"``). ``on_step(StepEvent)``
    is called after every step taken, the last included; it may raise (to stop the run from outside).

    Returns the :class:`Trained` state at the end; its ``best`` is the ``best`` given (the same
    object) when no evaluation beat ``best_loss``.
    """
    stopped, waited, taken = "steps", 0, start
    for t in range(start, steps):
        weights, opt_state, loss = step(weights, opt_state, *batches(t))
        loss, held, stopping, taken = float(loss), None, None, t + 1
        if not math.isfinite(loss):
            stopping = "nonfinite"
        elif taken % eval_every == 0 or taken == steps:
            held = held_loss(weights)
            if not math.isfinite(held):
                stopping = "nonfinite"
            elif held < best_loss:
                best, best_loss, best_step, waited = jax.tree.map(jnp.copy, weights), held, taken, 0
            elif patience is not None:
                waited += 1
                stopping = "early" if waited >= patience else None
        state = Trained(weights, opt_state, best, best_loss, best_step, taken, stopping or stopped)
        if on_step is not None:
            on_step(StepEvent(taken, loss, held, stopping, state))
        if stopping is not None:
            return state
    return Trained(weights, opt_state, best, best_loss, best_step, taken, stopped)


def nonzero_masks(weights):
    """The masks of pruned weights: ``True`` where a weight is not 0 (kept), like the ``weights`` pytree."""
    return jax.tree.map(lambda w: w != 0, weights)


def linear_weights_filter(names):
    """An nnx filter selecting the states whose path, joined by dots, is one of ``names``
    (``"model.layers.3.mlp.up_proj.weight"`` style, relative to the module split)."""
    wanted = set(names)
    return lambda path, _: ".".join(str(p) for p in path) in wanted


def masked_update(optimizer, weights, opt_state, grads, masks):
    """One optax step in which pruned entries (``masks`` false, boolean arrays like the
    weights) stay exactly 0: their gradient, update and so their Adam moments are 0, and the
    weight is not touched even by a non-finite update."""
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, masks)
    updates, opt_state = optimizer.update(grads, opt_state, weights)
    return jax.tree.map(lambda w, u, m: jnp.where(m, w + u, w), weights, updates, masks), opt_state


def check_fields(owner: str, settings, counts: dict, rates: tuple = ()) -> None:
    """Raise ``ValueError`` naming the field (``recover steps must be an int ≥ 0, got -1``) unless
    each of ``counts`` is an int at least its value and each of ``rates`` a finite number ≥ 0.
    ``settings`` is a (frozen) dataclass; its counts are stored back as plain ints."""
    for name, least in counts.items():  # a numpy int becomes an int (settings are recorded as JSON)
        object.__setattr__(settings, name, check_int(f"{owner} {name}", getattr(settings, name), least))
    for name in rates:
        check_number(f"{owner} {name}", getattr(settings, name))
