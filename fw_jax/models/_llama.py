"""LLaMA-family decoder (LLaMA 1/2/3, Mistral, Qwen2/2.5, SmolLM2) as a Flax NNX module.

Pre-norm blocks with RMSNorm, rotary position embeddings (rotate-half layout, base and scaling
from the config), grouped-query attention, a SwiGLU MLP, and tied or untied embeddings. Qwen2
adds biases to q/k/v; LLaMA's ``attention_bias``/``mlp_bias`` are honoured too.

Attribute names follow Hugging Face, so the flattened parameter path of every weight is its
name in a ``transformers`` checkpoint (``model.layers.0.self_attn.q_proj.weight``).
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

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The numbers a LLaMA-family model needs, read from a ``transformers`` config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: tuple  # sorted items of the HF rope dict (hashable)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple  # one entry per layer: window length or None
    hidden_act: str

    @classmethod
    def from_hf(cls, config) -> "LlamaSpec":
        model_type = config.model_type
        if model_type not in LLAMA_MODEL_TYPES:
            raise ValueError(f"not a LLaMA-family config: model_type={model_type!r}")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
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
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=tuple(windows),
            hidden_act=getattr(config, "hidden_act", "silu"),
        )


class LlamaAttention(nnx.Module):
    def __init__(self, spec: LlamaSpec):
        d, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.q_proj = Linear(d, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * hd, d, bias=spec.o_bias)

    def __call__(self, x, cos, sin, sliding_window, captured):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = causal_attention(q, k, v, sliding_window=sliding_window).reshape(b, t, -1)
        captured["attn_out"] = a
        return self.o_proj(a)


class LlamaMLP(nnx.Module):
    def __init__(self, spec: LlamaSpec):
        d, f = spec.hidden_size, spec.intermediate_size
        if spec.hidden_act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {spec.hidden_act!r} (only silu is supported)")
        self.gate_proj = Linear(d, f, bias=spec.mlp_bias)
        self.up_proj = Linear(d, f, bias=spec.mlp_bias)
        self.down_proj = Linear(f, d, bias=spec.mlp_bias)

    def __call__(self, x, captured):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        captured["mlp_mid"] = hidden
        return self.down_proj(hidden)


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm block; see :data:`LINEAR_GROUPS` for which linears share an input."""

    # (input key, linear layers fed by that input), names relative to the block.
    LINEAR_GROUPS = (
        ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("attn_out", ("self_attn.o_proj",)),
        ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp_mid", ("mlp.down_proj",)),
    )

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
        cos, sin = context
        captured = {}
        x = self.input_layernorm(h)
        captured["attn_in"] = x
        h = h + self.self_attn(x, cos, sin, self.sliding_window, captured)
        x = self.post_attention_layernorm(h)
        captured["mlp_in"] = x
        h = h + self.mlp(x, captured)
        return h, captured


class LlamaModel(nnx.Module):
    def __init__(self, spec: LlamaSpec):
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nnx.List(
            [LlamaDecoderLayer(spec, spec.sliding_windows[i]) for i in range(spec.num_layers)]
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """LLaMA-family causal LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    block_path = "model.layers"

    def __init__(self, spec: LlamaSpec):
        self.spec = spec
        self.model = LlamaModel(spec)
        self.lm_head = output_head(spec.hidden_size, spec.vocab_size, spec.tie_word_embeddings)
        inv_freq, scaling = rope_inverse_frequencies(spec.head_dim, dict(spec.rope_parameters))
        self._inv_freq = tuple(float(f) for f in inv_freq)
        self._rope_scaling = float(scaling)

    @property
    def blocks(self):
        return self.model.layers

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.model.embed_tokens(tokens).astype(F32)

    def block_context(self, seq_len: int):
        """Arrays every block needs besides its hidden states: RoPE ``(cos, sin)``."""
        return rope_cos_sin(jnp.arange(seq_len), self._inv_freq, self._rope_scaling)

    def block_forward(self, b: int, h: jax.Array):
        """Run block ``b`` on hidden states (B, T, d): ``(next_hidden, linear inputs)``."""
        return self.model.layers[b].forward(h, self.block_context(h.shape[1]))

    def head(self, h: jax.Array) -> jax.Array:
        return self.project(self.model.norm(h), self.model.embed_tokens)


FAMILY = Family(
    name="llama",
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"},
    spec=LlamaSpec,
    model=LlamaForCausalLM,
)
