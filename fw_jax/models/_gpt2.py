"""GPT-2 as a Flax NNX module.

Learned position embeddings, pre-norm LayerNorm blocks, fused ``c_attn`` (q, k, v), ``gelu_new``
MLP and a head tied to the token embeddings. Hugging Face stores GPT-2's linears as ``Conv1D``
with weights ``(d_in, d_out)``; our :class:`~fw_jax.models._layers.Linear` keeps ``(d_out, d_in)``
like every other family, and the loaders transpose at the boundary (see ``_hf.py``).
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
    LayerNorm,
    Linear,
    causal_attention,
    output_head,
    pre_norm_block,
)

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}

# Names of GPT-2 linear weights stored by Hugging Face as Conv1D, i.e. (d_in, d_out).
CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


@dataclasses.dataclass(frozen=True)
class GPT2Spec:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str
    scale_attn_weights: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config) -> "GPT2Spec":
        if config.model_type != "gpt2":
            raise ValueError(f"not a GPT-2 config: model_type={config.model_type!r}")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise NotImplementedError("scale_attn_by_inverse_layer_idx=True is not supported")
        if config.activation_function not in _ACTIVATIONS:
            raise NotImplementedError(f"activation_function {config.activation_function!r}")
        return cls(
            vocab_size=config.vocab_size,
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.n_inner or 4 * config.n_embd,
            layer_norm_epsilon=float(config.layer_norm_epsilon),
            activation_function=config.activation_function,
            scale_attn_weights=bool(getattr(config, "scale_attn_weights", True)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )


class GPT2Attention(nnx.Module):
    def __init__(self, spec: GPT2Spec):
        d = spec.n_embd
        self.n_head, self.scale = spec.n_head, spec.scale_attn_weights
        self.c_attn = Linear(d, 3 * d, bias=True)
        self.c_proj = Linear(d, d, bias=True)

    def __call__(self, x, captured):
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (y.reshape(b, t, self.n_head, hd) for y in (q, k, v))
        a = causal_attention(q, k, v, scale=None if self.scale else 1.0).reshape(b, t, d)
        captured["attn_out"] = a
        return self.c_proj(a)


class GPT2MLP(nnx.Module):
    def __init__(self, spec: GPT2Spec):
        self.activation = spec.activation_function
        self.c_fc = Linear(spec.n_embd, spec.n_inner, bias=True)
        self.c_proj = Linear(spec.n_inner, spec.n_embd, bias=True)

    def __call__(self, x, captured):
        hidden = _ACTIVATIONS[self.activation](self.c_fc(x))
        captured["mlp_mid"] = hidden
        return self.c_proj(hidden)


class GPT2Block(nnx.Module):
    LINEAR_GROUPS = (
        ("attn_in", ("attn.c_attn",)),
        ("attn_out", ("attn.c_proj",)),
        ("mlp_in", ("mlp.c_fc",)),
        ("mlp_mid", ("mlp.c_proj",)),
    )

    def __init__(self, spec: GPT2Spec):
        self.ln_1 = LayerNorm(spec.n_embd, spec.layer_norm_epsilon)
        self.attn = GPT2Attention(spec)
        self.ln_2 = LayerNorm(spec.n_embd, spec.layer_norm_epsilon)
        self.mlp = GPT2MLP(spec)

    def forward(self, h, context=()):
        """Returns ``(next_hidden, inputs)``; GPT-2 blocks need no ``context``."""
        return pre_norm_block(h, self.ln_1, self.attn, self.ln_2, self.mlp)


class GPT2Model(nnx.Module):
    def __init__(self, spec: GPT2Spec):
        self.wte = Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = Embedding(spec.n_positions, spec.n_embd)
        self.h = nnx.List([GPT2Block(spec) for _ in range(spec.n_layer)])
        self.ln_f = LayerNorm(spec.n_embd, spec.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 causal LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    block_path = "transformer.h"

    def __init__(self, spec: GPT2Spec):
        self.spec = spec
        self.transformer = GPT2Model(spec)
        self.lm_head = output_head(spec.n_embd, spec.vocab_size, spec.tie_word_embeddings)

    @property
    def blocks(self):
        return self.transformer.h

    def embed(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[-1])
        return (self.transformer.wte(tokens) + self.transformer.wpe(positions)).astype(F32)

    def block_context(self, seq_len: int):
        return ()

    def head(self, h: jax.Array) -> jax.Array:
        return self.project(self.transformer.ln_f(h), self.transformer.wte)


FAMILY = Family(
    name="gpt2",
    architectures={"gpt2": "GPT2LMHeadModel"},
    spec=GPT2Spec,
    model=GPT2LMHeadModel,
    transposed=CONV1D_SUFFIXES,
    optional_prefix="transformer.",
    buffers=(".attn.bias", ".attn.masked_bias"),
    embedding="transformer.wte.weight",
)
