"""Phi-3 decoder (Phi-3, Phi-3.5-mini, Phi-4-mini: ``model_type`` ``phi3``) as a Flax NNX module.

LLaMA's pre-norm block with two fused linears, kept as stored: ``self_attn.qkv_proj`` (query,
key and value rows stacked, ``((H + 2·H_kv)·head_dim, d)``) and ``mlp.gate_up_proj`` (gate rows,
then up rows, ``(2·f, d)``). Pruning sees each as one ``(d_out, d_in)`` layer whose rows get the
per-row budget over their inputs, the same rows a split q/k/v or gate/up would have. RoPE may
rotate only the first ``partial_rotary_factor · head_dim`` dimensions of each head (Phi-4-mini:
0.75), with ``default`` or ``longrope`` frequencies (LongRoPE's long factors for sequences longer
than ``original_max_position_embeddings``, its short ones otherwise, as ``transformers`` picks
them per forward pass); a ``sliding_window`` applies to every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._family import Family
from ._layers import (DecoderSpec, LlamaLayoutLM, LlamaLayoutModel, Linear, RMSNorm, apply_rope,
    causal_attention, pre_norm_block, rope_cos_sin, rope_inverse_frequencies)

PHI3_MODEL_TYPES = ("phi3",)
_ROPE_TYPES = ("default", "longrope")


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Phi3Spec(DecoderSpec):
    """The numbers a Phi-3 model needs, read from a ``transformers`` config."""

    rope_parameters: tuple  # sorted items of the HF rope dict (lists as tuples: hashable)
    rotary_dim: int  # the leading dimensions of each head that RoPE rotates
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    hidden_act: str

    @classmethod
    def from_hf(cls, config) -> "Phi3Spec":
        if config.model_type not in PHI3_MODEL_TYPES:
            raise ValueError(f"not a Phi-3 config: model_type={config.model_type!r}")
        fields = DecoderSpec.fields_from_hf(config)
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise NotImplementedError(f"phi3 hidden_act {hidden_act!r} is not supported (only silu)")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise NotImplementedError(f"phi3 rope_type {rope_type!r} is not supported "
                                      f"(supported: {', '.join(_ROPE_TYPES)})")
        rope["rope_type"] = rope_type
        rotary_dim = int(fields["head_dim"] * float(rope["partial_rotary_factor"]))
        if rope_type == "longrope":
            rope.setdefault("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", None))
            for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
                if rope.get(key) is None:
                    raise NotImplementedError(f"phi3 longrope without rope_parameters[{key!r}]")
            for key in ("short_factor", "long_factor"):
                if len(rope[key]) != rotary_dim // 2:
                    raise NotImplementedError(f"phi3 longrope {key} has {len(rope[key])} entries; "
                                              f"expected rotary_dim / 2 = {rotary_dim // 2}")
        window = getattr(config, "sliding_window", None)
        return cls(
            **fields,
            rope_parameters=tuple(sorted((k, _hashable(v)) for k, v in rope.items() if v is not None)),
            rotary_dim=rotary_dim,
            max_position_embeddings=int(config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            hidden_act=hidden_act,
        )


def phi3_rope_frequencies(spec: Phi3Spec, seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``(rotary_dim // 2,)`` and attention scaling for sequences of ``seq_len``.

    ``longrope``: ``1 / (e_i · base^(2i/rotary_dim))`` with ``e`` the ``long_factor`` when
    ``seq_len > original_max_position_embeddings``, else the ``short_factor``; the cos/sin
    scaling is ``attention_factor``, by default ``sqrt(1 + ln(s) / ln(original))`` for
    ``s = factor`` (or ``max_position_embeddings / original``) above 1, and 1 otherwise.
    """
    rope = dict(spec.rope_parameters)
    if rope["rope_type"] != "longrope":
        return rope_inverse_frequencies(spec.rotary_dim, rope)
    original = float(rope["original_max_position_embeddings"])
    factor = rope.get("factor")
    factor = spec.max_position_embeddings / original if factor is None else float(factor)
    scaling = rope.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1.0 + math.log(factor) / math.log(original))
    extension = np.asarray(rope["long_factor"] if seq_len > original else rope["short_factor"], np.float32)
    dim = spec.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(rope["rope_theta"]) ** exponents
    return (np.float32(1.0) / (extension * base)).astype(np.float32), float(scaling)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` dimensions of each head of ``x`` (B, T, H, head_dim)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return jnp.concatenate([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], axis=-1)


class Phi3Attention(nnx.Module):
    """Grouped-query attention whose q/k/v come from one fused ``qkv_proj`` (no biases).

    The input of ``o_proj`` is recorded as ``captured["attn_out"]``.
    """

    def __init__(self, spec: Phi3Spec):
        d, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.sliding_window = spec.sliding_window
        self.qkv_proj = Linear(d, (spec.num_heads + 2 * spec.num_kv_heads) * hd, bias=False)
        self.o_proj = Linear(spec.num_heads * hd, d, bias=False)

    def __call__(self, x: jax.Array, captured: dict, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        b, t, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        q = qkv[..., :q_size].reshape(b, t, self.num_heads, self.head_dim)
        k = qkv[..., q_size:q_size + kv_size].reshape(b, t, self.num_kv_heads, self.head_dim)
        v = qkv[..., q_size + kv_size:].reshape(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        a = causal_attention(q, k, v, sliding_window=self.sliding_window).reshape(b, t, -1)
        captured["attn_out"] = a
        return self.o_proj(a)


class Phi3MLP(nnx.Module):
    """SwiGLU from one fused ``gate_up_proj`` (gate rows first): ``down_proj(silu(g) * u)``.

    The input of ``down_proj`` is recorded as ``captured["mlp_mid"]``.
    """

    def __init__(self, spec: Phi3Spec):
        d, f = spec.hidden_size, spec.intermediate_size
        self.intermediate_size = f
        self.gate_up_proj = Linear(d, 2 * f, bias=False)
        self.down_proj = Linear(f, d, bias=False)

    def __call__(self, x: jax.Array, captured: dict) -> jax.Array:
        gate_up = self.gate_up_proj(x)
        f = self.intermediate_size
        hidden = jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]
        captured["mlp_mid"] = hidden
        return self.down_proj(hidden)


class Phi3DecoderLayer(nnx.Module):
    """One pre-norm block; see :data:`LINEAR_GROUPS` for which linears share an input."""

    #: (input key, linear layers fed by that input), names relative to the block: the fused
    #: layers are pruned as stored, one layer each.
    LINEAR_GROUPS = (
        ("attn_in", ("self_attn.qkv_proj",)),
        ("attn_out", ("self_attn.o_proj",)),
        ("mlp_in", ("mlp.gate_up_proj",)),
        ("mlp_mid", ("mlp.down_proj",)),
    )

    def __init__(self, spec: Phi3Spec):
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Phi3Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = Phi3MLP(spec)

    def forward(self, h, context):
        """Returns ``(next_hidden, inputs)`` with the input of every linear group.

        ``context`` is the model's ``block_context(T)``: the RoPE ``(cos, sin)`` tables.
        """
        attention = functools.partial(self.self_attn, rope=context)
        return pre_norm_block(h, self.input_layernorm, attention, self.post_attention_layernorm, self.mlp)


class Phi3Model(LlamaLayoutModel):
    def __init__(self, spec: Phi3Spec):
        layers = [Phi3DecoderLayer(spec) for _ in range(spec.num_layers)]
        super().__init__(spec, layers, RMSNorm(spec.hidden_size, spec.rms_norm_eps))


class Phi3ForCausalLM(LlamaLayoutLM):
    """Phi-3 causal LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: Phi3Spec):
        super().__init__(spec, Phi3Model(spec))

    def block_context(self, seq_len: int):
        """RoPE ``(cos, sin)`` of shape ``(T, rotary_dim)``; with ``longrope`` they depend on
        ``seq_len`` (see :func:`phi3_rope_frequencies`)."""
        inv_freq, scaling = phi3_rope_frequencies(self.spec, seq_len)
        return rope_cos_sin(jnp.arange(seq_len), inv_freq, scaling)


FAMILY = Family(
    name="phi3",
    architectures={"phi3": "Phi3ForCausalLM"},
    spec=Phi3Spec,
    model=Phi3ForCausalLM,
)
