"""Gemma 3 (text) decoder as a Flax NNX module.

Differences from the LLaMA family: embeddings scaled by ``sqrt(d)``; RMSNorm multiplies by
``1 + w``; four norms per block (before and after attention and MLP); RMSNorm of each query and
key head before RoPE; attention scale ``query_pre_attn_scalar^-1/2``; interleaved sliding-window
(local RoPE base) and full-attention (global RoPE base) layers; GeGLU (tanh GELU) MLP; optional
soft-capping of the final logits (like transformers, ``attn_logit_softcapping`` is ignored).
Names follow Hugging Face's ``Gemma3ForCausalLM`` (``model.layers.0.self_attn.q_norm.weight``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ._family import Family
from ._layers import (
    F32,
    CausalLM,
    Embedding,
    Linear,
    RMSNorm,
    apply_rope,
    causal_attention,
    output_head,
    rope_cos_sin,
    rope_inverse_frequencies,
)

GEMMA3_MODEL_TYPES = ("gemma3_text",)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma3Spec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple
    rope_parameters: tuple  # ((layer_type, sorted rope items), ...)
    attention_bias: bool
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config) -> "Gemma3Spec":
        if config.model_type not in GEMMA3_MODEL_TYPES:
            raise ValueError(f"not a Gemma 3 text config: model_type={config.model_type!r}")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("use_bidirectional_attention=True is not supported")
        if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise NotImplementedError(f"hidden_activation {config.hidden_activation!r}")
        rope = config.rope_parameters
        rope_items = tuple(
            (t, tuple(sorted((k, v) for k, v in dict(rope[t]).items() if v is not None)))
            for t in _LAYER_TYPES
        )
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            sliding_window=int(config.sliding_window),
            layer_types=tuple(config.layer_types),
            rope_parameters=rope_items,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            attn_logit_softcapping=getattr(config, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )


def GemmaRMSNorm(dim: int, eps: float) -> RMSNorm:
    """Gemma's RMSNorm: ``x / sqrt(mean(x²) + eps) * (1 + w)`` in float32."""
    return RMSNorm(dim, eps, offset=1.0)


class Gemma3Attention(nnx.Module):
    def __init__(self, spec: Gemma3Spec, layer_type: str):
        d, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.scale = spec.query_pre_attn_scalar**-0.5
        # transformers' Gemma3 never applies attn_logit_softcapping (Gemma 2 did); neither do we.
        self.softcap = None
        self.sliding_window = spec.sliding_window if layer_type == "sliding_attention" else None
        self.q_proj = Linear(d, spec.num_heads * hd, bias=spec.attention_bias)
        self.k_proj = Linear(d, spec.num_kv_heads * hd, bias=spec.attention_bias)
        self.v_proj = Linear(d, spec.num_kv_heads * hd, bias=spec.attention_bias)
        self.o_proj = Linear(spec.num_heads * hd, d, bias=spec.attention_bias)
        self.q_norm = GemmaRMSNorm(hd, spec.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(hd, spec.rms_norm_eps)

    def __call__(self, x, cos, sin, captured):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = causal_attention(
            q,
            k,
            v,
            sliding_window=self.sliding_window,
            scale=self.scale,
            logit_softcap=self.softcap,
        ).reshape(b, t, -1)
        captured["attn_out"] = a
        return self.o_proj(a)


class Gemma3MLP(nnx.Module):
    def __init__(self, spec: Gemma3Spec):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(d, f, bias=False)
        self.up_proj = Linear(d, f, bias=False)
        self.down_proj = Linear(f, d, bias=False)

    def __call__(self, x, captured):
        hidden = jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x)
        captured["mlp_mid"] = hidden
        return self.down_proj(hidden)


class Gemma3DecoderLayer(nnx.Module):
    LINEAR_GROUPS = (
        ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("attn_out", ("self_attn.o_proj",)),
        ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp_mid", ("mlp.down_proj",)),
    )

    def __init__(self, spec: Gemma3Spec, layer_type: str):
        self.layer_type = layer_type
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = Gemma3Attention(spec, layer_type)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = Gemma3MLP(spec)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)

    def forward(self, h, context):
        """``context``: ``{layer_type: (cos, sin)}`` from the model's ``block_context``."""
        cos, sin = context[self.layer_type]
        captured = {}
        x = self.input_layernorm(h)
        captured["attn_in"] = x
        h = h + self.post_attention_layernorm(self.self_attn(x, cos, sin, captured))
        x = self.pre_feedforward_layernorm(h)
        captured["mlp_in"] = x
        h = h + self.post_feedforward_layernorm(self.mlp(x, captured))
        return h, captured


class Gemma3TextModel(nnx.Module):
    def __init__(self, spec: Gemma3Spec):
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nnx.List([Gemma3DecoderLayer(spec, t) for t in spec.layer_types])
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    block_path = "model.layers"

    def __init__(self, spec: Gemma3Spec):
        self.spec = spec
        self.model = Gemma3TextModel(spec)
        self.lm_head = output_head(spec.hidden_size, spec.vocab_size, spec.tie_word_embeddings)

    @property
    def blocks(self):
        return self.model.layers

    def embed(self, tokens: jax.Array) -> jax.Array:
        scale = jnp.asarray(self.spec.hidden_size**0.5, F32)
        return self.model.embed_tokens(tokens).astype(F32) * scale

    def block_context(self, seq_len: int):
        """RoPE ``(cos, sin)`` for each layer type (local and global bases differ)."""
        positions = jnp.arange(seq_len)
        context = {}
        for layer_type, items in self.spec.rope_parameters:
            inv_freq, scaling = rope_inverse_frequencies(self.spec.head_dim, dict(items))
            context[layer_type] = rope_cos_sin(positions, inv_freq, scaling)
        return context

    def block_forward(self, b: int, h: jax.Array):
        return self.model.layers[b].forward(h, self.block_context(h.shape[1]))

    def head(self, h: jax.Array) -> jax.Array:
        out = self.project(self.model.norm(h), self.model.embed_tokens)
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            out = jnp.tanh(out / cap) * jnp.asarray(cap, F32)
        return out


FAMILY = Family(
    name="gemma3",
    architectures={"gemma3_text": "Gemma3ForCausalLM"},
    spec=Gemma3Spec,
    model=Gemma3ForCausalLM,
    bos_per_window=True,
)
