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
from ._layers import (F32, ROPE_GATED_LINEAR_GROUPS, DecoderSpec, GatedMLP, LlamaLayoutLM, LlamaLayoutModel,
    RMSNorm, RopeAttention, pre_norm_block, rope_cos_sin, rope_inverse_frequencies)

GEMMA3_MODEL_TYPES = ("gemma3_text",)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma3Spec(DecoderSpec):
    """The numbers a Gemma 3 text model needs, read from a ``transformers`` config."""

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
            **DecoderSpec.fields_from_hf(config),
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


class Gemma3Attention(RopeAttention):
    """RMSNorm of each query and key head before RoPE, scale ``query_pre_attn_scalar^-1/2``, and
    a sliding window on ``sliding_attention`` layers."""

    def __init__(self, spec: Gemma3Spec, layer_type: str):
        super().__init__(spec, qkv_bias=spec.attention_bias, o_bias=spec.attention_bias)
        self.scale = spec.query_pre_attn_scalar**-0.5
        # transformers' Gemma3 never applies attn_logit_softcapping (Gemma 2 did); neither do we.
        self.softcap = None
        self.sliding_window = spec.sliding_window if layer_type == "sliding_attention" else None
        self.q_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)

    def norm_heads(self, q, k):
        return self.q_norm(q), self.k_norm(k)

    def __call__(self, x, captured, rope):
        return super().__call__(x, captured, rope, sliding_window=self.sliding_window,
                                scale=self.scale, logit_softcap=self.softcap)


class Gemma3MLP(GatedMLP):
    """GeGLU with tanh GELU, no biases."""

    @staticmethod
    def act(x):
        return jax.nn.gelu(x, approximate=True)

    def __init__(self, spec: Gemma3Spec):
        super().__init__(spec, bias=False)


class Gemma3DecoderLayer(nnx.Module):
    """A pre-norm block whose attention and MLP outputs are normed too before the residual sum."""

    LINEAR_GROUPS = ROPE_GATED_LINEAR_GROUPS
    attention = Gemma3Attention  #: the attention class (Gemma 2's block differs only there)

    def __init__(self, spec: Gemma3Spec, layer_type: str):
        self.layer_type = layer_type
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = self.attention(spec, layer_type)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = Gemma3MLP(spec)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)

    def forward(self, h, context):
        """``context``: ``{layer_type: (cos, sin)}`` from the model's ``block_context``."""
        rope = context[self.layer_type]

        def attention(x, captured):
            return self.post_attention_layernorm(self.self_attn(x, captured, rope))

        def mlp(x, captured):
            return self.post_feedforward_layernorm(self.mlp(x, captured))

        return pre_norm_block(h, self.input_layernorm, attention, self.pre_feedforward_layernorm, mlp)


class Gemma3TextModel(LlamaLayoutModel):
    def __init__(self, spec: Gemma3Spec):
        layers = [Gemma3DecoderLayer(spec, t) for t in spec.layer_types]
        super().__init__(spec, layers, GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps))


class Gemma3ForCausalLM(LlamaLayoutLM):
    """Gemma 3 text LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: Gemma3Spec):
        super().__init__(spec, Gemma3TextModel(spec))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return super().embed(tokens) * jnp.asarray(self.spec.hidden_size**0.5, F32)

    def block_context(self, seq_len: int):
        """RoPE ``(cos, sin)`` for each layer type (local and global bases differ)."""
        positions = jnp.arange(seq_len)
        context = {}
        for layer_type, items in self.spec.rope_parameters:
            inv_freq, scaling = rope_inverse_frequencies(self.spec.head_dim, dict(items))
            context[layer_type] = rope_cos_sin(positions, inv_freq, scaling)
        return context

    def head(self, h: jax.Array) -> jax.Array:
        out = super().head(h)
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
    recover_warning=(
        "recovery made Gemma 3 270M worse (50%: perplexity 136.5 / 1373.4 with it, 47.0 / 35.5 without): a few "
        "massive channels of its residual stream hold most of the energy recovery's loss measures, and at the "
        "default learning rate the loss falls while the model's next-token loss rises; --recover-lr 3e-4 removes the "
        "harm (47.4 / 41.5) but gains nothing over --reconstruct alone (results/recover_gemma3.md)"),
)
