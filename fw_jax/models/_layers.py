"""Building blocks shared by the model families: linear, norms, rotary embeddings, attention.

:class:`CausalLM` is what every model shares (embed → blocks → head). The LLaMA family and
Gemma 3 also share one layout (``model.embed_tokens``, ``model.layers``, ``model.norm``,
``lm_head``; :class:`LlamaLayoutLM`) and their blocks' parts: :class:`DecoderSpec`,
:class:`RopeAttention`, :class:`GatedMLP`, :func:`pre_norm_block`; a family's file keeps only
what differs.

Every weight is a float32 ``nnx.Param``. :class:`Linear` stores its weight as ``(d_out, d_in)``
under the attribute ``weight``, so that the flattened parameter path of a linear layer is its
Hugging Face name (``model.layers.3.mlp.up_proj.weight``) and pruning code can read and write
it in the orientation of the layer problem ``W X``.
"""

from __future__ import annotations

import dataclasses
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

    A subclass defines ``block_path`` (where the blocks sit: ``"model.layers"``), ``blocks``
    (the decoder blocks, each with ``forward(h, context) -> (next_hidden, linear inputs)`` and
    ``LINEAR_GROUPS``), ``embed``, ``block_context`` (what every block needs besides its hidden
    states) and ``head``, and sets ``lm_head`` to a :class:`Linear` or, for an output head tied
    to the input embedding, ``None``.
    """

    def project(self, h: jax.Array, embedding: Embedding) -> jax.Array:
        """Logits of final hidden states: ``lm_head``, or the tied ``embedding``."""
        return embedding.attend(h) if self.lm_head is None else self.lm_head(h)

    def block_forward(self, b: int, h: jax.Array):
        """Run block ``b`` on hidden states (B, T, d): ``(next_hidden, linear inputs)``."""
        return self.blocks[b].forward(h, self.block_context(h.shape[1]))

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


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The numbers every LLaMA-layout model needs (LLaMA family, Gemma 3); a family's spec
    extends it with its own."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float

    @staticmethod
    def fields_from_hf(config) -> dict:
        """These fields of a ``transformers`` config; without ``num_key_value_heads`` there are
        as many key/value heads as heads, without ``head_dim`` it is ``hidden_size // heads``."""
        heads = config.num_attention_heads
        return dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=float(config.rms_norm_eps),
        )


class RopeAttention(nnx.Module):
    """Grouped-query causal self-attention with rotate-half RoPE (LLaMA, Gemma 3).

    ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` are :class:`Linear`; the input of
    ``o_proj`` is recorded as ``captured["attn_out"]``. A subclass may override
    :meth:`norm_heads`, applied to the query and key heads before RoPE.
    """

    def __init__(self, spec: DecoderSpec, *, qkv_bias: bool, o_bias: bool):
        d, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.q_proj = Linear(d, spec.num_heads * hd, bias=qkv_bias)
        self.k_proj = Linear(d, spec.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = Linear(d, spec.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = Linear(spec.num_heads * hd, d, bias=o_bias)

    def norm_heads(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Query and key heads (B, T, heads, head_dim) before RoPE: unchanged here."""
        return q, k

    def __call__(self, x: jax.Array, captured: dict, rope: tuple[jax.Array, jax.Array],
                 **options) -> jax.Array:
        """Attention of ``x`` (B, T, d); ``rope`` is ``(cos, sin)`` (:func:`rope_cos_sin`),
        ``options`` go to :func:`causal_attention` (``sliding_window``, ``scale``, ...)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = self.norm_heads(q, k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = causal_attention(q, k, v, **options).reshape(b, t, -1)
        captured["attn_out"] = a
        return self.o_proj(a)


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU, GeGLU; a subclass defines ``act``.

    The input of ``down_proj`` is recorded as ``captured["mlp_mid"]``.
    """

    def __init__(self, spec: DecoderSpec, *, bias: bool):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def __call__(self, x: jax.Array, captured: dict) -> jax.Array:
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x)
        captured["mlp_mid"] = hidden
        return self.down_proj(hidden)


#: The linear groups of a block with a :class:`RopeAttention` ``self_attn`` and a
#: :class:`GatedMLP` ``mlp``: (input key, linear layers fed by that input), names relative to
#: the block.
ROPE_GATED_LINEAR_GROUPS = (
    ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attn_out", ("self_attn.o_proj",)),
    ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp_mid", ("mlp.down_proj",)),
)


def pre_norm_block(h: jax.Array, attention_norm, attention, mlp_norm, mlp) -> tuple[jax.Array, dict]:
    """One pre-norm decoder block: ``h + attention(attention_norm(h))``, then the same with ``mlp``.

    ``attention`` and ``mlp`` take ``(x, captured)`` and record their inner linear inputs
    (``attn_out``, ``mlp_mid``) in ``captured``. Returns ``(next_hidden, captured)``, the input
    of every linear group: also ``attn_in`` and ``mlp_in``, the normed inputs.
    """
    captured = {}
    x = attention_norm(h)
    captured["attn_in"] = x
    h = h + attention(x, captured)
    x = mlp_norm(h)
    captured["mlp_in"] = x
    h = h + mlp(x, captured)
    return h, captured


class LlamaLayoutModel(nnx.Module):
    """The ``model`` of a :class:`LlamaLayoutLM`: ``embed_tokens``, decoder ``layers``, ``norm``."""

    def __init__(self, spec: DecoderSpec, layers: list[nnx.Module], norm: nnx.Module):
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nnx.List(layers)
        self.norm = norm


class LlamaLayoutLM(CausalLM):
    """A :class:`CausalLM` laid out like Hugging Face's LLaMA (Gemma 3 too): ``model`` (a
    :class:`LlamaLayoutModel`) and ``lm_head``; a subclass defines ``block_context``.

    ``spec`` is a :class:`DecoderSpec` with a ``tie_word_embeddings`` field.
    """

    block_path = "model.layers"

    def __init__(self, spec: DecoderSpec, model: LlamaLayoutModel):
        self.spec = spec
        self.model = model
        self.lm_head = output_head(spec.hidden_size, spec.vocab_size, spec.tie_word_embeddings)

    @property
    def blocks(self):
        return self.model.layers

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.model.embed_tokens(tokens).astype(F32)

    def head(self, h: jax.Array) -> jax.Array:
        return self.project(self.model.norm(h), self.model.embed_tokens)
