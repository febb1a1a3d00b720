"""The layer objective ``L(M) = ‖WX − (M⊙W)X‖²_F = tr(R G Rᵀ)`` with ``R = W ⊙ (1 − M)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


@jax.jit
def row_errors(weight: Array, gram: Array, mask: Array) -> Array:
    """Per-row error ``r_i G r_iᵀ`` of keeping ``mask ⊙ weight``.

    Args:
      weight: ``(d_out, d_in)`` weights.
      gram: ``(d_in, d_in)`` Gram matrix ``X Xᵀ`` of the layer's inputs.
      mask: ``(d_out, d_in)`` mask (binary or relaxed), 1 = kept.

    Returns:
      ``(d_out,)`` errors, in the promoted dtype of the inputs.

    Example:
      >>> fw_jax.row_errors(W, G, mask).shape  # (d_out,)
    """
    residual = weight * (1 - mask)
    return jnp.sum((residual @ gram) * residual, axis=-1)


@jax.jit
def layer_error(weight: Array, gram: Array, mask: Array) -> Array:
    """Total error ``tr(R G Rᵀ)`` of keeping ``mask ⊙ weight`` (see :func:`row_errors`).

    Example:
      >>> fw_jax.layer_error(W, G, fw_jax.wanda_mask(W, G, k))  # Wanda's error on G
    """
    return jnp.sum(row_errors(weight, gram, mask))


@jax.jit
def weights_error(weight: Array, gram: Array, new_weight: Array) -> Array:
    """Error ``tr((W − Ŵ) G (W − Ŵ)ᵀ)`` of replacing ``weight`` by ``new_weight``."""
    diff = weight - new_weight
    return jnp.sum((diff @ gram) * diff)


@jax.jit
def inputs_error(weight: Array, inputs: Array, new_weight: Array) -> Array:
    """The same error ``‖(W − Ŵ) Xᵀ‖²`` from the ``(n, d_in)`` inputs themselves: ``2·d_out·d_in·n``
    operations instead of ``2·d_out·d_in²``, so cheaper when there are fewer tokens than inputs."""
    out = (weight - new_weight) @ inputs.T
    return jnp.sum(out * out)
