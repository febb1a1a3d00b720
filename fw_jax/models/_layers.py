"""Building blocks shared by the model families: linear, norms, rotary embeddings, attention.

Every weight is a float32 ``nnx.Param``. :class:`Linear` stores its weight as ``(d_out, d_in)``
under the attribute ``weight``, so that the flattened parameter path of a linear layer is its
Hugging Face name (``model.layers.3.mlp.up_proj.weight``) and pruning code can read and write
it in the orientation of the layer problem ``W X``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32
# Full float32 matmuls everywhere: GPUs would otherwise use TF32 and drift from the reference.
HIGHEST = jax.lax.Precision.HIGHEST


def _empty(shape) -> jax.Array:
    # Models are built under nnx.eval_shape and then filled from a checkpoint, so the initial
    # value only needs the right shape and dtype.
    return jnp.zeros(shape, F32)


class Linear(nnx.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as ``(d_out, d_in)``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool):
        self.d_in, self.d_out = d_in, d_out
        self.weight = nnx.Param(_empty((d_out, d_in)))
        self.bias = nnx.Param(_empty((d_out,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(
            "...i,oi->...o", x, self.weight[...], preferred_element_type=F32, precision=HIGHEST
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    """Token (or position) table of shape ``(num, dim)``."""

    def __init__(self, num: int, dim: int):
        self.weight = nnx.Param(_empty((num, dim)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: logits ``x Eᵀ``."""
        return jnp.einsum(
            "...d,vd->...v", x, self.weight[...], preferred_element_type=F32, precision=HIGHEST
        )


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x²) + eps) * (offset + w)`` computed in float32.

    ``offset`` is 0 in the LLaMA convention and 1 in Gemma's (weights stored as ``w``, applied as
    ``1 + w``).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        self.eps = float(eps)
        self.offset = float(offset)
        self.weight = nnx.Param(_empty((dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(F32)
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + jnp.asarray(self.eps, F32)) * (self.offset + self.weight[...])


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * w + b`` (GPT-2)."""

    def __init__(self, dim: int, eps: float):
        self.eps = float(eps)
        self.weight = nnx.Param(_empty((dim,)))
        self.bias = nnx.Param(_empty((dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(F32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + jnp.asarray(self.eps, F32))
        return y * self.weight[...] + self.bias[...]


class CausalLM(nnx.Module):
    """What every decoder-only LM here shares: ``model(tokens)`` is embed → blocks → head.

    A subclass defines ``blocks`` (the decoder blocks), ``embed``, ``block_forward`` (block ``b``
    on hidden states: ``(next_hidden, linear inputs)``) and ``head``, and sets ``lm_head`` to a
    :class:`Linear` or, for an output head tied to the input embedding, ``None``.
    """

    def project(self, h: jax.Array, embedding: Embedding) -> jax.Array:
        """Logits of final hidden states: ``lm_head``, or the tied ``embedding``."""
        return embedding.attend(h) if self.lm_head is None else self.lm_head(h)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for b in range(len(self.blocks)):
            h, _ = self.block_forward(b, h)
        return self.head(h)


def output_head(hidden_size: int, vocab_size: int, tied: bool) -> Linear | None:
    """The LM head of a model: ``None`` when tied to the input embedding."""
    return None if tied else Linear(hidden_size, vocab_size, bias=False)


def rope_inverse_frequencies(head_dim: int, rope_parameters: dict) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention scaling of rotary embeddings, from a HF rope dict.

    Supports ``rope_type`` ``default``, ``linear`` (positions divided by ``factor``) and
    ``llama3`` (long wavelengths divided by ``factor``, smooth interpolation in between).

    Returns:
      ``(inv_freq, attention_scaling)``; ``inv_freq`` has shape ``(head_dim // 2,)``.
    """
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    base = float(rope_parameters["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return (inv_freq / np.float32(rope_parameters["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        factor = float(rope_parameters["factor"])
        low, high = (
            float(rope_parameters["low_freq_factor"]),
            float(rope_parameters["high_freq_factor"]),
        )
        old_len = float(rope_parameters["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scaling: float = 1.0):
    """``cos`` and ``sin`` tables of shape ``(T, head_dim)`` for rotate-half RoPE."""
    freqs = positions.astype(F32)[:, None] * jnp.asarray(inv_freq, F32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` of shape ``(B, T, H, head_dim)`` in Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Softmax attention with a causal mask; ``k``/``v`` may have fewer heads (GQA).

    Shapes: ``q`` (B, T, H, D), ``k``/``v`` (B, T, H_kv, D) with ``H`` a multiple of ``H_kv``.
    Scores are ``scale · q·k`` (default ``1/sqrt(D)``), optionally soft-capped
    ``c·tanh(s/c)``; position ``i`` sees ``j ≤ i`` (and ``i - j < sliding_window``).
    Returns (B, T, H, D) in float32.
    """
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    group = h // h_kv
    q = q.reshape(b, t, h_kv, group, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=F32, precision=HIGHEST)
    scores = scores * jnp.asarray(d**-0.5 if scale is None else scale, F32)
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * jnp.asarray(logit_softcap, F32)
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    scores = jnp.where(allowed, scores, jnp.asarray(-jnp.inf, F32))
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=F32, precision=HIGHEST)
    return out.reshape(b, t, h, d)
