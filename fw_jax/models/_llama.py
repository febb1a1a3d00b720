"""LLaMA-family decoder (LLaMA 1/2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as a Flax NNX module.

Pre-norm blocks with RMSNorm, rotary position embeddings (rotate-half layout, base and scaling
from the config), grouped-query attention, a SwiGLU MLP, and tied or untied embeddings. Qwen2
adds biases to q/k/v; LLaMA's ``attention_bias``/``mlp_bias`` are honoured too. Qwen3 is LLaMA
with an RMSNorm of each query and key head before RoPE (``self_attn.q_norm``/``k_norm``);
sliding-window layers follow the config's ``layer_types`` (Qwen2, Qwen3) or cover every layer
(Mistral).

Attribute names follow Hugging Face, so the flattened parameter path of every weight is its
name in a ``transformers`` checkpoint (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ._family import Family
from ._layers import (ROPE_GATED_LINEAR_GROUPS, DecoderSpec, GatedMLP, LlamaLayoutLM, LlamaLayoutModel,
    RMSNorm, RopeAttention, pre_norm_block, rope_cos_sin, rope_inverse_frequencies)

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaSpec(DecoderSpec):
    """The numbers a LLaMA-family model needs, read from a ``transformers`` config."""

    rope_parameters: tuple  # sorted items of the HF rope dict (hashable)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple  # one entry per layer: window length or None
    hidden_act: str
    qk_norm: bool  # RMSNorm of each query and key head before RoPE (Qwen3)

    @classmethod
    def from_hf(cls, config) -> "LlamaSpec":
        model_type = config.model_type
        if model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"not a LLaMA-family config: model_type={model_type!r}")
        rope = getattr(config, "rope_parameters", None)
        if rope is None:  # transformers 4.x configs
            rope = dict(getattr(config, "rope_scaling", None) or {})
            rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
        if isinstance(rope, dict) and "rope_theta" not in rope and "full_attention" in rope:
            rope = rope["full_attention"]  # per-layer-type dicts (not used by these families)
        rope = dict(rope)
        rope.setdefault("rope_type", "default")
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        windows = [None] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window:
            if model_type == "mistral":
                windows = [int(window)] * config.num_hidden_layers
            elif layer_types:
                windows = [int(window) if t == "sliding_attention" else None for t in layer_types]
        return cls(
            **DecoderSpec.fields_from_hf(config),
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=tuple(windows),
            hidden_act=getattr(config, "hidden_act", "silu"),
            qk_norm=model_type == "qwen3",
        )


class LlamaAttention(RopeAttention):
    """With ``spec.qk_norm`` (Qwen3), each query and key head is RMS-normed before RoPE."""

    def __init__(self, spec: LlamaSpec):
        super().__init__(spec, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def norm_heads(self, q, k):
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)


class LlamaMLP(GatedMLP):
    """SwiGLU."""

    act = staticmethod(jax.nn.silu)

    def __init__(self, spec: LlamaSpec):
        if spec.hidden_act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {spec.hidden_act!r} (only silu is supported)")
        super().__init__(spec, bias=spec.mlp_bias)


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm block; see :data:`LINEAR_GROUPS` for which linears share an input."""

    LINEAR_GROUPS = ROPE_GATED_LINEAR_GROUPS

    def __init__(self, spec: LlamaSpec, sliding_window: int | None):
        self.sliding_window = sliding_window
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LlamaAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = LlamaMLP(spec)

    def forward(self, h, context):
        """Returns ``(next_hidden, inputs)`` with the input of every linear group.

        ``context`` is the model's ``block_context(T)``: the RoPE ``(cos, sin)`` tables.
        """
        attention = functools.partial(self.self_attn, rope=context, sliding_window=self.sliding_window)
        return pre_norm_block(h, self.input_layernorm, attention, self.post_attention_layernorm, self.mlp)


class LlamaModel(LlamaLayoutModel):
    def __init__(self, spec: LlamaSpec):
        layers = [LlamaDecoderLayer(spec, spec.sliding_windows[i]) for i in range(spec.num_layers)]
        super().__init__(spec, layers, RMSNorm(spec.hidden_size, spec.rms_norm_eps))


class LlamaForCausalLM(LlamaLayoutLM):
    """LLaMA-family causal LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: LlamaSpec):
        super().__init__(spec, LlamaModel(spec))
        inv_freq, scaling = rope_inverse_frequencies(spec.head_dim, dict(spec.rope_parameters))
        self._inv_freq = tuple(float(f) for f in inv_freq)
        self._rope_scaling = float(scaling)

    def block_context(self, seq_len: int):
        """Arrays every block needs besides its hidden states: RoPE ``(cos, sin)``."""
        return rope_cos_sin(jnp.arange(seq_len), self._inv_freq, self._rope_scaling)


FAMILY = Family(
    name="llama",
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM"},
    spec=LlamaSpec,
    model=LlamaForCausalLM,
)
