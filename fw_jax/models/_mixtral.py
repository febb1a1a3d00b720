"""Mixtral (sparse mixture of experts) as a Flax NNX module.

LLaMA's attention (RoPE, grouped-query, no biases; a sliding window over every layer when the
config sets ``sliding_window``) and, in place of the MLP, a :class:`~fw_jax.models._moe.SparseMoE`
of ``num_local_experts`` SwiGLU experts with ``num_experts_per_tok`` of them per token, their
weights renormalised to sum 1. Names follow the Mixtral checkpoints on the Hub, one tensor per
expert (``model.layers.0.block_sparse_moe.experts.3.w1.weight``; ``w1`` gate, ``w3`` up,
``w2`` down; the router is ``block_sparse_moe.gate``), which is also what ``transformers``'
``save_pretrained`` writes.
"""

from __future__ import annotations

import dataclasses

from ._family import Family
from ._layers import DecoderSpec, RopeAttention
from ._moe import Expert, MoEDecoderLayer, MoEForCausalLM, MoESpec, SparseMoE, rope_items

MIXTRAL_MODEL_TYPES = ("mixtral",)


@dataclasses.dataclass(frozen=True)
class MixtralSpec(MoESpec):
    """The numbers a Mixtral model needs, read from a ``transformers`` config."""

    @classmethod
    def from_hf(cls, config) -> MixtralSpec:
        if config.model_type not in MIXTRAL_MODEL_TYPES:
            raise ValueError(f"not a Mixtral config: model_type={config.model_type!r}")
        cls.check_activation(config)
        window = getattr(config, "sliding_window", None)
        return cls(
            **DecoderSpec.fields_from_hf(config),
            rope_parameters=rope_items(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=False,
            sliding_window=int(window) if window else None,
            num_experts=int(config.num_local_experts),
            top_k=int(config.num_experts_per_tok),
            norm_topk_prob=True,
            expert_size=int(config.intermediate_size),
            sparse_layers=(True,) * config.num_hidden_layers,
        )


class MixtralExpert(Expert):
    NAMES = ("w1", "w3", "w2")


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: MixtralSpec):
        layers = [
            MoEDecoderLayer(spec, RopeAttention(spec, qkv_bias=False, o_bias=False), "block_sparse_moe",
                            SparseMoE("block_sparse_moe", spec.hidden_size, spec.expert_size, spec.num_experts,
                                      spec.top_k, spec.norm_topk_prob, MixtralExpert))
            for _ in range(spec.num_layers)
        ]
        super().__init__(spec, layers)


FAMILY = Family(
    name="mixtral",
    architectures={"mixtral": "MixtralForCausalLM"},
    spec=MixtralSpec,
    model=MixtralForCausalLM,
)
