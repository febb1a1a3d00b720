"""Flax models of the GPT families fw_jax prunes, their checkpoint loaders, and converters.

- Models (Flax NNX): :class:`LlamaForCausalLM` (LLaMA 1/2/3, Mistral, Qwen2, Qwen3, SmolLM2),
  :class:`GPT2LMHeadModel`, :class:`Gemma3ForCausalLM`, :class:`Gemma2ForCausalLM` and
  :class:`Phi3ForCausalLM` (Phi-3, Phi-3.5-mini, Phi-4-mini), and the mixtures of experts
  :class:`MixtralForCausalLM` and :class:`Qwen3MoeForCausalLM`; parameters sit at their Hugging
  Face names.
- Checkpoints: :func:`load_model` (HF folders, sharded safetensors, GGUF, Flax msgpack,
  ``"smollm2-135m"``, ``"gemma3-270m"``), :func:`save_hf_folder` (sharded, in the checkpoint's
  dtype), :func:`save_flax_folder`.
- Out of core: ``load_model(path, stream=True)`` reads a block when :func:`load_block` (or
  ``with resident_block(loaded, b)``) asks and :func:`unload_block` drops it;
  :func:`write_block_shard` writes one block's shard as soon as it is pruned.
- What the pruning engine needs from a model: :class:`Blocks` (:class:`LoadedBlocks` for the
  models above, :func:`as_blocks`).
- Calibration, block by block: :func:`embed`, :func:`block_linears`, :func:`block_grams`,
  :func:`set_linear_weights`, :func:`run_block`, :func:`head` (see ``_calibration.py``); for
  experts that few tokens reached, :func:`with_expert_fallback` and :func:`fallback_experts`.
- Any Flax linen model: :func:`linen_linears`, :func:`linen_grams`, :func:`set_linen_linears`.
"""

from ._blocks import Blocks, LoadedBlocks, as_blocks
from ._calibration import (
    LinearLayer,
    block_grams,
    block_inputs,
    block_linears,
    embed,
    head,
    logits,
    num_blocks,
    run_block,
)
from ._errors import BrokenInstallError, CheckpointError, CheckpointNote, UnsupportedModelError
from ._eval import perplexity
from ._gemma2 import Gemma2ForCausalLM, Gemma2Spec
from ._gemma3 import Gemma3ForCausalLM, Gemma3Spec
from ._gguf import load_gguf
from ._gpt2 import GPT2LMHeadModel, GPT2Spec
from ._hf import load_hf_folder, save_hf_folder, write_hf_files
from ._linen import LinenLinear, linen_grams, linen_linears, set_linen_linears
from ._llama import LlamaForCausalLM, LlamaSpec
from ._loaded import (
    DTYPES,
    FAMILIES,
    LoadedModel,
    family_of,
    load_block,
    is_resident,
    load_rest,
    output_dtype,
    resident_block,
    round_to,
    unload_block,
    unload_rest,
)
from ._loading import GEMMA3_NAME, SMOLLM2_NAME, gemma3_gguf_path, load_model, smollm2_gguf_path
from ._msgpack import load_flax_folder, save_flax_folder, write_flax_files
from ._phi3 import Phi3ForCausalLM, Phi3Spec
from ._mixtral import MixtralForCausalLM, MixtralSpec
from ._moe import fallback_experts, with_expert_fallback
from ._qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSpec
from ._safetensors import WriteError

#: Output formats and their writers, ``writer(loaded, folder, block_files=None)`` into an existing
#: folder: ``"hf"`` sharded safetensors (:func:`write_hf_files`), ``"flax"`` a Flax msgpack.
WRITERS = {"hf": write_hf_files, "flax": write_flax_files}
from ._shards import INDEX_NAME, block_shard_name, read_block_shard, write_block_shard
from ._params import (
    get_linear_weight,
    get_param,
    linear_names,
    param_names,
    resolve,
    set_linear_weight,
    set_linear_weights,
    set_param,
)

__all__ = [
    "BrokenInstallError",
    "Blocks",
    "LoadedBlocks",
    "as_blocks",
    "CheckpointError",
    "CheckpointNote",
    "DTYPES",
    "FAMILIES",
    "INDEX_NAME",
    "WRITERS",
    "WriteError",
    "block_shard_name",
    "load_block",
    "output_dtype",
    "read_block_shard",
    "resident_block",
    "round_to",
    "unload_block",
    "unload_rest",
    "is_resident",
    "load_rest",
    "write_block_shard",
    "GEMMA3_NAME",
    "GPT2LMHeadModel",
    "Gemma3ForCausalLM",
    "Gemma3Spec",
    "Gemma2ForCausalLM",
    "Gemma2Spec",
    "Phi3ForCausalLM",
    "Phi3Spec",
    "MixtralForCausalLM",
    "MixtralSpec",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeSpec",
    "fallback_experts",
    "with_expert_fallback",
    "GPT2Spec",
    "LinearLayer",
    "LinenLinear",
    "LlamaForCausalLM",
    "LlamaSpec",
    "LoadedModel",
    "family_of",
    "SMOLLM2_NAME",
    "UnsupportedModelError",
    "block_grams",
    "block_inputs",
    "block_linears",
    "embed",
    "gemma3_gguf_path",
    "get_linear_weight",
    "get_param",
    "head",
    "linear_names",
    "linen_grams",
    "linen_linears",
    "load_flax_folder",
    "load_gguf",
    "load_hf_folder",
    "load_model",
    "logits",
    "num_blocks",
    "param_names",
    "perplexity",
    "run_block",
    "save_flax_folder",
    "save_hf_folder",
    "write_hf_files",
    "write_flax_files",
    "resolve",
    "set_linear_weight",
    "set_linear_weights",
    "set_linen_linears",
    "set_param",
    "smollm2_gguf_path",
]
