"""Sparse mixture-of-experts blocks: routing, experts, per-expert calibration and its fallback.

Shared by the mixture-of-experts families (Mixtral in ``_mixtral.py``, Qwen3-MoE in
``_qwen3_moe.py``); a later family or front-end reuses :class:`SparseMoE` and the calibration
functions below.

**Routing** (as ``transformers``' top-k routers compute it). For a token ``x``, the router
``gate`` gives one logit per expert, ``r = W_g x``; ``p = softmax(r)`` in float32, and the token
goes to the ``k`` experts of largest ``p`` (``num_experts_per_tok``) with weights ``p_e``, divided
by their sum when ``norm_topk_prob`` (Mixtral always does). The output is
``Σ_{e routed} w_e · down_e(silu(gate_e x) ⊙ up_e x)``. Here every expert runs on every token and a
token's unrouted experts are multiplied by a weight of exactly zero: the same numbers as a
gathering kernel, for ``E/k`` times the expert arithmetic (fine for calibration and evaluation).

**Calibration.** Each expert is pruned on the tokens routed to it. For expert ``e`` the block
records its input masked to those tokens (zero rows elsewhere) under the input key
``<moe>.experts.<e>.in`` (shared by its gate and up projections), and its activation
``silu(gate_e x) ⊙ up_e x`` masked the same way under ``<moe>.experts.<e>.mid`` (the down
projection's input), where ``<moe>`` is the block's MoE module (``block_sparse_moe``, ``mlp``).
So :func:`~fw_jax.models.block_grams` gives each expert ``G_e = Σ_{t routed to e} x_t x_tᵀ``
with no change to the calibration machinery, and ``block_grams(..., return_counts=True)`` how
many tokens each expert received. The router is not pruned (it is no member of any group).

**Fallback for an expert that received too few tokens.** An expert that fewer calibration
tokens were routed to than it has inputs (the model's hidden size ``d``) has a singular input
Gram matrix that says little about it. :func:`with_expert_fallback` replaces its two matrices by
the rule of ``_experts.py`` (the same for ``fw_jax.prune``'s experts), once the Gram matrices are
summed over every calibration sample: gate and up projections get the mean of the block's
experts' input matrices (every token entering the layer, scaled by ``k/E``), the down projection
``c·I`` (``c`` the mean diagonal entry of the experts' ``mid`` matrices: a row keeps its largest
weights).

Measured on a tiny random Mixtral block (d=64, experts of width 256, 4 experts, top 2; 50% of
each row; the error ``‖(W − Ŵ)X‖²`` over 4,096 held-out tokens, those routed to the expert, as a
multiple of the error of masks from the expert's own Gram matrix over its 1,600-2,400 calibration
tokens; mean over the experts)::

    masks from                           Wanda            SparseFW
                                         gate/up  down    gate/up  down
    the fallback                         1.00     1.21    1.00     1.34
    the expert's own Gram, 16 tokens     1.09     1.70    1.27     1.96
    the expert's own Gram, 64 tokens     1.02     1.20    1.08     1.28
    the expert's own Gram, 128 tokens    1.01     1.09    1.04     1.18
    a random mask                        7.4      8.4     9.3      9.2

With fewer tokens than ``d`` = 64 the fallback did better than the expert's own matrix (at 64 they
are about even on down), hence the threshold. In a random model the routed tokens are a random
share of all, which flatters the gate/up fallback: a trained model's experts see their own kinds of
token. :func:`fallback_experts` names the experts that used
it, for the run's report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ._experts import ExpertLayer, Stage, fallback
from ._layers import (F32, ROPE_GATED_LINEAR_GROUPS, DecoderSpec, GatedMLP, Linear, LlamaLayoutLM, LlamaLayoutModel,
    RMSNorm, RopeAttention, pre_norm_block, rope_cos_sin, rope_inverse_frequencies)


def rope_items(config) -> tuple:
    """The sorted items of a config's RoPE dict (``rope_parameters``, or ``rope_theta`` and
    ``rope_scaling`` in transformers 4.x configs), hashable for a frozen spec."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    rope = dict(rope)
    rope.setdefault("rope_type", "default")
    return tuple(sorted((k, v) for k, v in rope.items() if v is not None))


@dataclasses.dataclass(frozen=True)
class MoESpec(DecoderSpec):
    """The numbers a mixture-of-experts decoder needs; a family's spec reads them from its config.

    ``intermediate_size`` is the width of a dense layer's MLP, ``expert_size`` that of one expert;
    ``sparse_layers[i]`` says whether layer ``i`` has experts (Qwen3-MoE can make some dense).
    """

    rope_parameters: tuple
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    expert_size: int
    sparse_layers: tuple

    @staticmethod
    def check_activation(config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {act!r} (only silu is supported)")


class Expert(nnx.Module):
    """One SwiGLU expert ``down(silu(gate x) ⊙ up x)``; a subclass names its three linear layers
    as the checkpoint does, in :attr:`NAMES` ``(gate, up, down)``."""

    NAMES: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hidden_size: int, expert_size: int):
        gate, up, down = self.NAMES
        setattr(self, gate, Linear(hidden_size, expert_size, bias=False))
        setattr(self, up, Linear(hidden_size, expert_size, bias=False))
        setattr(self, down, Linear(expert_size, hidden_size, bias=False))

    def mid(self, x: jax.Array) -> jax.Array:
        """The down projection's input ``silu(gate x) ⊙ up x``."""
        gate, up, _ = self.NAMES
        return jax.nn.silu(getattr(self, gate)(x)) * getattr(self, up)(x)

    def down(self, mid: jax.Array) -> jax.Array:
        return getattr(self, self.NAMES[2])(mid)


class SparseMoE(nnx.Module):
    """A router (``gate``, a :class:`Linear` of ``E`` outputs) and ``E`` experts (``experts``);
    ``name`` is its attribute in the block, the start of its input keys (module text)."""

    def __init__(self, name: str, hidden_size: int, expert_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, expert: type[Expert]):
        if not 0 < top_k <= num_experts:
            raise NotImplementedError(f"num_experts_per_tok={top_k} with {num_experts} experts")
        self.name, self.top_k, self.norm_topk_prob = name, top_k, norm_topk_prob
        self.gate = Linear(hidden_size, num_experts, bias=False)
        self.experts = nnx.List([expert(hidden_size, expert_size) for _ in range(num_experts)])

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(routed, weights)`` of tokens ``x`` (..., d), both (..., E) float32: ``routed`` is 1
        for the ``k`` experts a token goes to and 0 elsewhere, ``weights`` their output weights."""
        probs = jax.nn.softmax(self.gate(x).astype(F32), axis=-1)
        top, chosen = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        one_hot = jax.nn.one_hot(chosen, len(self.experts), dtype=F32)  # (..., k, E)
        return jnp.sum(one_hot, axis=-2), jnp.sum(one_hot * top[..., None], axis=-2)

    def linear_groups(self) -> tuple:
        """``(input key, members)`` of every expert (names relative to the block)."""
        groups = []
        gate, up, down = self.experts[0].NAMES
        for e in range(len(self.experts)):
            at = f"{self.name}.experts.{e}"
            groups.append((f"{at}.in", (f"{at}.{gate}", f"{at}.{up}")))
            groups.append((f"{at}.mid", (f"{at}.{down}",)))
        return tuple(groups)

    def __call__(self, x: jax.Array, captured: dict) -> jax.Array:
        routed, weights = self.route(x)
        out = jnp.zeros(x.shape, F32)
        for e, expert in enumerate(self.experts):
            mask = routed[..., e:e + 1]
            mid = expert.mid(x)
            captured[f"{self.name}.experts.{e}.in"] = x * mask
            captured[f"{self.name}.experts.{e}.mid"] = mid * mask
            out = out + weights[..., e:e + 1] * expert.down(mid)
        return out


class SwiGLU(GatedMLP):
    """A dense layer's MLP in a mixture-of-experts model (Qwen3-MoE's ``mlp_only_layers``)."""

    act = staticmethod(jax.nn.silu)


class MoEDecoderLayer(nnx.Module):
    """A pre-norm block: RMSNorm, attention, RMSNorm, then a :class:`SparseMoE` (or a dense MLP)
    at the attribute ``mlp_name``. Its linear groups are attention's and each expert's."""

    def __init__(self, spec: MoESpec, attention: RopeAttention, mlp_name: str, mlp: nnx.Module):
        self.sliding_window = spec.sliding_window
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)

    @property
    def moe(self) -> SparseMoE | None:
        """The block's :class:`SparseMoE`, or ``None`` for a dense layer."""
        mlp = getattr(self, self.mlp_name)
        return mlp if isinstance(mlp, SparseMoE) else None

    @property
    def LINEAR_GROUPS(self) -> tuple:
        """``(input key, linear layers)``: q/k/v, o, then each expert's gate and up, and its down
        (a dense layer's are :data:`ROPE_GATED_LINEAR_GROUPS`, its MLP being named ``mlp``)."""
        moe = self.moe
        return ROPE_GATED_LINEAR_GROUPS if moe is None else ROPE_GATED_LINEAR_GROUPS[:2] + moe.linear_groups()

    def forward(self, h, context):
        """``(next_hidden, inputs)``; ``context`` is the model's RoPE ``(cos, sin)``."""

        def attention(x, captured):
            return self.self_attn(x, captured, context, sliding_window=self.sliding_window)

        return pre_norm_block(h, self.input_layernorm, attention, self.post_attention_layernorm,
                              getattr(self, self.mlp_name))


class MoEForCausalLM(LlamaLayoutLM):
    """A causal LM of :class:`MoEDecoderLayer` blocks laid out like LLaMA, with RoPE from
    ``spec.rope_parameters``; ``model(tokens)`` maps (B, T) ids to (B, T, vocab) float32 logits."""

    def __init__(self, spec: MoESpec, layers: list[MoEDecoderLayer]):
        super().__init__(spec, LlamaLayoutModel(spec, layers, RMSNorm(spec.hidden_size, spec.rms_norm_eps)))
        inv_freq, scaling = rope_inverse_frequencies(spec.head_dim, dict(spec.rope_parameters))
        self._inv_freq = tuple(float(f) for f in inv_freq)
        self._rope_scaling = float(scaling)

    def block_context(self, seq_len: int):
        """RoPE ``(cos, sin)`` tables, the same for every block."""
        return rope_cos_sin(jnp.arange(seq_len), self._inv_freq, self._rope_scaling)


# --- Calibration: which experts fall back, and their Gram matrices. ---------------------------

def _moe_of(model: nnx.Module, b: int) -> SparseMoE | None:
    block = model.blocks[b]
    return block.moe if isinstance(block, MoEDecoderLayer) else None


def _expert_at(model: nnx.Module, b: int, moe: SparseMoE, e: int) -> str:
    return f"{model.block_path}.{b}.{moe.name}.experts.{e}"


def expert_layer(model: nnx.Module, b: int) -> ExpertLayer | None:
    """Block ``b``'s experts as :class:`~fw_jax.models._experts.ExpertLayer` (``None`` without
    experts): the stages ``<expert>.in`` (shared by its gate and up projections) and
    ``<expert>.mid`` (its down projection's), the threshold the hidden size."""
    moe = _moe_of(model, b)
    if moe is None:
        return None
    experts = tuple(_expert_at(model, b, moe, e) for e in range(len(moe.experts)))
    return ExpertLayer(experts, (Stage(tuple(f"{x}.in" for x in experts), shared=True),
                                 Stage(tuple(f"{x}.mid" for x in experts), shared=False)), moe.gate.d_in)


def expert_tokens(model: nnx.Module, b: int, counts: Mapping[str, int]) -> dict[str, int]:
    """``{expert name: calibration tokens routed to it}`` for block ``b`` (empty without experts),
    from the counts of ``block_grams(..., return_counts=True)``."""
    layer = expert_layer(model, b)
    return {} if layer is None else layer.tokens(counts)


def has_experts(model: nnx.Module, b: int) -> bool:
    """Whether block ``b`` of ``model`` is a mixture of experts (its Gram matrices then come with
    token counts, for :func:`with_expert_fallback`)."""
    return _moe_of(model, b) is not None


def fallback_experts(model: nnx.Module, b: int, counts: Mapping[str, int], *,
                     min_tokens: int | None = None) -> dict[str, int]:
    """The experts of block ``b`` pruned on fallback Gram matrices, with the number of calibration
    tokens routed to each: ``{expert name: tokens}``, empty for a block without experts.

    For the run's report. An expert is named like ``"model.layers.3.block_sparse_moe.experts.5"``;
    its linear layers are those of :func:`~fw_jax.models.block_linears` whose name starts with
    that and a dot (its gate, up and down projections), and :func:`with_expert_fallback` gave them
    the fallback matrices because fewer than ``min_tokens`` tokens reached it. A report could say
    ``"block 3, expert 5: 2 calibration tokens routed to it, pruned on the fallback Gram
    matrices (every token for gate/up, the identity for down)"``.

    Args:
      model: the model (``loaded.model``).
      b: block index.
      counts: ``{input key: tokens}`` over the whole calibration set, as
        ``block_grams(..., return_counts=True)`` returns them (added over chunks and processes
        when the Gram matrices are).
      min_tokens: the threshold; ``None``: the model's hidden size (the number of inputs of the
        expert's gate and up projections, so that its own input Gram matrix would be singular).

    Example::

        grams, counts = models.block_grams(model, b, hidden, return_counts=True)
        grams = models.with_expert_fallback(model, b, grams, counts)
        for expert, tokens in models.fallback_experts(model, b, counts).items():
            print(f"{expert}: {tokens} tokens, pruned on the fallback Gram matrices")
    """
    layer = expert_layer(model, b)
    return {} if layer is None else layer.falling_back(counts, min_tokens)


def with_expert_fallback(model: nnx.Module, b: int, grams: Mapping[str, jax.Array], counts: Mapping[str, int], *,
                         min_tokens: int | None = None) -> dict[str, jax.Array]:
    """Block ``b``'s Gram matrices with the fallback for each expert that too few calibration
    tokens were routed to (:func:`fallback_experts`; the rule is
    :func:`fw_jax.models._experts.fallback`'s, the measurement behind it in this module's text).

    Such an expert's gate/up matrix becomes the mean of the block's experts' input matrices (the
    Gram matrix of every token entering the layer, scaled by ``k/E``), its down matrix ``c·I``
    (``c`` the mean diagonal entry of the experts' ``mid`` matrices, so each method keeps a row's
    largest weights). Every other matrix is returned unchanged, and all of them for a block without
    experts.

    Apply it to the Gram matrices of the whole calibration set (added over chunks and processes),
    never to a part: the counts decide, and they are counts over all tokens.

    Args:
      model: the model (``loaded.model``).
      b: block index.
      grams: ``{input key: (d_in, d_in)}`` from :func:`~fw_jax.models.block_grams`.
      counts: ``{input key: tokens}``, as for :func:`fallback_experts`.
      min_tokens: the threshold, as for :func:`fallback_experts` (``None``: the hidden size).

    Returns:
      A new dict with the same keys.
    """
    layer = expert_layer(model, b)
    if layer is None:
        return dict(grams)
    return fallback(layer, grams, counts, min_tokens=min_tokens)[0]


#: What transformers keeps in memory and writes with ``save_pretrained(save_original_format=False)``:
#: all experts of a layer in one 3-D tensor.
_FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def fused_experts_problem(names) -> str | None:
    """The problem to report for a checkpoint that stores a layer's experts fused in one tensor
    (``mlp.experts.gate_up_proj``), given the tensors the model has no parameter for; ``None``
    when none of them is such a tensor."""
    fused = [n for n in names if n.endswith(_FUSED_EXPERTS)]
    if not fused:
        return None
    return (f"tensor {fused[0]!r} holds every expert of a layer in one tensor, the layout transformers keeps in "
            "memory (save_pretrained(..., save_original_format=False) writes it). fw_jax reads the layout of the "
            "checkpoints on the Hub, one tensor per expert (…experts.0.gate_proj.weight or "
            "…block_sparse_moe.experts.0.w1.weight), and writes the pruned model back in it: load the folder with "
            "transformers and save it again with save_pretrained(folder), whose default writes that layout")
