"""Gemma 2 decoder as a Flax NNX module.

Gemma 3's block without its query/key norms: embeddings scaled by ``sqrt(d)``, RMSNorm
multiplying by ``1 + w``, four norms per block (before and after attention and MLP), attention
scale ``query_pre_attn_scalar^-1/2``, GeGLU (tanh GELU) MLP, sliding-window and full-attention
layers interleaved (``layer_types``; a config without them has sliding windows on the even
layers, as ``transformers`` reads it), one RoPE base for all layers, and soft-capping of the
attention scores (``attn_logit_softcapping``, applied, unlike Gemma 3) and of the final logits.
Names follow Hugging Face's ``Gemma2ForCausalLM`` (``model.layers.0.post_feedforward_layernorm``).
"""

from __future__ import annotations

import dataclasses

from ._family import Family
from ._gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3Spec, GemmaRMSNorm
from ._layers import LlamaLayoutLM, LlamaLayoutModel, RopeAttention, rope_inverse_frequencies

GEMMA2_MODEL_TYPES = ("gemma2",)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma2Spec(Gemma3Spec):
    """The numbers a Gemma 2 model needs, read from a ``transformers`` config.

    The fields are :class:`Gemma3Spec`'s; ``rope_parameters`` holds Gemma 2's one RoPE dict
    under both layer types, so the blocks look up their tables as Gemma 3's do.
    """

    @classmethod
    def from_hf(cls, config) -> "Gemma2Spec":
        if config.model_type not in GEMMA2_MODEL_TYPES:
            raise ValueError(f"not a Gemma 2 config: model_type={config.model_type!r}")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("gemma2 with use_bidirectional_attention=True is not supported")
        activation = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise NotImplementedError(f"gemma2 hidden_activation {activation!r} is not supported "
                                      "(only gelu_pytorch_tanh)")
        layer_types = tuple(config.layer_types or (
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)))
        unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
        if unknown:
            raise NotImplementedError(f"gemma2 layer_types {unknown} are not supported ({', '.join(_LAYER_TYPES)})")
        if "sliding_attention" in layer_types and not config.sliding_window:
            raise NotImplementedError(f"gemma2 sliding_attention layers need a sliding_window; "
                                      f"got sliding_window={config.sliding_window!r}")
        rope = dict(config.rope_parameters)
        rope.setdefault("rope_type", "default")
        items = tuple(sorted((k, v) for k, v in rope.items() if v is not None))
        fields = Gemma3Spec.fields_from_hf(config)
        rope_inverse_frequencies(fields["head_dim"], rope)  # refuses an unsupported rope_type now
        return cls(
            **fields,
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            sliding_window=int(config.sliding_window or 0),  # unused when no layer slides
            layer_types=layer_types,
            rope_parameters=tuple((t, items) for t in _LAYER_TYPES),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            attn_logit_softcapping=getattr(config, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )


class Gemma2Attention(RopeAttention):
    """Scale ``query_pre_attn_scalar^-1/2``, scores soft-capped ``c·tanh(s/c)`` with
    ``c = attn_logit_softcapping``, and a sliding window on ``sliding_attention`` layers."""

    def __init__(self, spec: Gemma2Spec, layer_type: str):
        super().__init__(spec, qkv_bias=spec.attention_bias, o_bias=spec.attention_bias)
        self.scale = spec.query_pre_attn_scalar**-0.5
        self.softcap = spec.attn_logit_softcapping
        self.sliding_window = spec.sliding_window if layer_type == "sliding_attention" else None

    def __call__(self, x, captured, rope):
        return super().__call__(x, captured, rope, sliding_window=self.sliding_window,
                                scale=self.scale, logit_softcap=self.softcap)


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    """Gemma 3's block (and its ``forward``) with :class:`Gemma2Attention`."""

    attention = Gemma2Attention


class Gemma2Model(LlamaLayoutModel):
    def __init__(self, spec: Gemma2Spec):
        layers = [Gemma2DecoderLayer(spec, t) for t in spec.layer_types]
        super().__init__(spec, layers, GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps))


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2 LM; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits.

    Gemma 3's embedding scale, RoPE tables and final soft-capping, over Gemma 2's blocks.
    """

    def __init__(self, spec: Gemma2Spec):
        # The layout's own constructor: Gemma3ForCausalLM's would build Gemma 3 blocks.
        LlamaLayoutLM.__init__(self, spec, Gemma2Model(spec))


FAMILY = Family(
    name="gemma2",
    architectures={"gemma2": "Gemma2ForCausalLM"},
    spec=Gemma2Spec,
    model=Gemma2ForCausalLM,
    bos_per_window=True,
)
