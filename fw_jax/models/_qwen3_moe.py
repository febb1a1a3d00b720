"""Qwen3-MoE as a Flax NNX module.

Qwen3's attention (an RMSNorm of each query and key head before RoPE, ``self_attn.q_norm`` and
``k_norm``; biases when ``attention_bias``; a sliding window over every layer when
``use_sliding_window``) and a :class:`~fw_jax.models._moe.SparseMoE` of ``num_experts`` SwiGLU
experts of width ``moe_intermediate_size``, ``num_experts_per_tok`` per token, their weights
renormalised only when ``norm_topk_prob``. Layer ``i`` has experts unless it is in
``mlp_only_layers`` or ``(i + 1)`` is not a multiple of ``decoder_sparse_step``; such a layer has
a dense SwiGLU MLP of width ``intermediate_size``. Names follow the checkpoints on the Hub, one
tensor per expert (``model.layers.0.mlp.experts.3.gate_proj.weight``; the router is
``mlp.gate``), which is also what ``transformers``' ``save_pretrained`` writes.

The attention is written here (a small :class:`~fw_jax.models._layers.RopeAttention` subclass)
rather than shared with the dense Qwen3 of ``_llama.py``, whose spec it would have to be.
"""

from __future__ import annotations

import dataclasses

from ._family import Family
from ._layers import DecoderSpec, RMSNorm, RopeAttention
from ._moe import Expert, MoEDecoderLayer, MoEForCausalLM, MoESpec, SparseMoE, SwiGLU, rope_items

QWEN3_MOE_MODEL_TYPES = ("qwen3_moe",)


@dataclasses.dataclass(frozen=True)
class Qwen3MoeSpec(MoESpec):
    """The numbers a Qwen3-MoE model needs, read from a ``transformers`` config."""

    @classmethod
    def from_hf(cls, config) -> Qwen3MoeSpec:
        if config.model_type not in QWEN3_MOE_MODEL_TYPES:
            raise ValueError(f"not a Qwen3-MoE config: model_type={config.model_type!r}")
        cls.check_activation(config)
        experts = int(config.num_experts)
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0
                       for i in range(config.num_hidden_layers))
        # transformers keeps sliding_window only with use_sliding_window (None otherwise).
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
        return cls(
            **DecoderSpec.fields_from_hf(config),
            rope_parameters=rope_items(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            sliding_window=int(window) if window else None,
            num_experts=experts,
            top_k=int(config.num_experts_per_tok),
            norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)),
            expert_size=int(config.moe_intermediate_size),
            sparse_layers=sparse,
        )


class Qwen3MoeAttention(RopeAttention):
    """RoPE attention with an RMSNorm of each query and key head before RoPE."""

    def __init__(self, spec: Qwen3MoeSpec):
        super().__init__(spec, qkv_bias=spec.attention_bias, o_bias=spec.attention_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)

    def norm_heads(self, q, k):
        return self.q_norm(q), self.k_norm(k)


class Qwen3MoeExpert(Expert):
    NAMES = ("gate_proj", "up_proj", "down_proj")


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Qwen3-MoE; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: Qwen3MoeSpec):
        def mlp(sparse: bool):
            if sparse:
                return SparseMoE("mlp", spec.hidden_size, spec.expert_size, spec.num_experts, spec.top_k,
                                 spec.norm_topk_prob, Qwen3MoeExpert)
            return SwiGLU(spec, bias=False)

        layers = [MoEDecoderLayer(spec, Qwen3MoeAttention(spec), "mlp", mlp(sparse)) for sparse in spec.sparse_layers]
        super().__init__(spec, layers)


FAMILY = Family(
    name="qwen3_moe",
    architectures={"qwen3_moe": "Qwen3MoeForCausalLM"},
    spec=Qwen3MoeSpec,
    model=Qwen3MoeForCausalLM,
)
