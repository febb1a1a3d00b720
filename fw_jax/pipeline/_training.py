"""What block-wise recovery (``recover.py``) and fine-tuning (``finetune.py``) share: the masked
optax update that keeps pruned entries exactly 0, and the checks of their settings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def masked_update(optimizer, weights, opt_state, grads, masks):
    """One optax step in which pruned entries (``masks`` false, boolean arrays like the
    weights) stay exactly 0: their gradient, update and so their Adam moments are 0, and the
    weight is not touched even by a non-finite update."""
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, masks)
    updates, opt_state = optimizer.update(grads, opt_state, weights)
    return jax.tree.map(lambda w, u, m: jnp.where(m, w + u, w), weights, updates, masks), opt_state


def check_fields(owner: str, settings, counts: dict, rates: tuple = ()) -> None:
    """Raise ``ValueError`` naming the field unless each of ``counts`` is an int at least its
    value and each of ``rates`` a finite number ≥ 0."""
    for name, least in counts.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{owner} {name} must be an int ≥ {least}, got {value!r}")
    for name in rates:
        value = getattr(settings, name)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{owner} {name} must be a finite number ≥ 0, got {value!r}")
