"""The loaded-model record and the family dispatch shared by all loaders."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fw_jax import _progress

from ._errors import CheckpointError, UnsupportedModelError
from ._gemma3 import GEMMA3_MODEL_TYPES, Gemma3ForCausalLM, Gemma3Spec
from ._gpt2 import CONV1D_SUFFIXES, GPT2LMHeadModel, GPT2Spec
from ._llama import LLAMA_MODEL_TYPES, LlamaForCausalLM, LlamaSpec
from ._params import param_shapes, set_param

FAMILIES = {
    "llama": (LlamaSpec, LlamaForCausalLM),
    "gpt2": (GPT2Spec, GPT2LMHeadModel),
    "gemma3": (Gemma3Spec, Gemma3ForCausalLM),
}

# transformers class names written to config.json so AutoModelForCausalLM finds the model.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclasses.dataclass
class LoadedModel:
    """A model with everything needed to run, prune and save it.

    Attributes:
      model: the Flax NNX module (``LlamaForCausalLM`` or ``GPT2LMHeadModel``).
      config: the ``transformers`` config it was built from (also used when saving).
      tokenizer: a ``transformers`` tokenizer, or ``None`` when the checkpoint has none.
      family: ``"llama"`` (LLaMA, Mistral, Qwen2, SmolLM2), ``"gpt2"`` or ``"gemma3"``.
      source: the path it was loaded from.
    """

    model: nnx.Module
    config: Any
    tokenizer: Any
    family: str
    source: str = ""


def family_of(config, path: str | os.PathLike = "") -> str:
    """``"llama"`` or ``"gpt2"`` for a ``transformers`` config; raises for other architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    if model_type == "gpt2":
        return "gpt2"
    if model_type in GEMMA3_MODEL_TYPES:
        return "gemma3"
    raise UnsupportedModelError(
        path,
        f"unsupported architecture model_type={model_type!r}; "
        f"supported: {', '.join(LLAMA_MODEL_TYPES + ('gpt2',) + GEMMA3_MODEL_TYPES)}",
    )


def build_abstract_model(config, path: str | os.PathLike = "") -> tuple[nnx.Module, str]:
    """The model for ``config`` with shape-only parameters (no memory), and its family."""
    family = family_of(config, path)
    spec_cls, model_cls = FAMILIES[family]
    try:
        spec = spec_cls.from_hf(config)
        return nnx.eval_shape(lambda: model_cls(spec)), family
    except NotImplementedError as e:
        raise UnsupportedModelError(path, str(e)) from e


def hf_to_model_name(family: str, tied: bool, hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name; ``None`` for tensors we do not keep."""
    if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
        return None  # buffers, not weights
    if tied and hf_name == "lm_head.weight":
        return None
    if family == "gpt2" and not hf_name.startswith(("transformer.", "lm_head.")):
        return "transformer." + hf_name  # the original gpt2 checkpoints have no prefix
    return hf_name


def is_transposed_in_hf(family: str, name: str) -> bool:
    """True for weights that Hugging Face stores as ``(d_in, d_out)`` (GPT-2 Conv1D)."""
    return family == "gpt2" and name.endswith(CONV1D_SUFFIXES)


def fill_model(model: nnx.Module, family: str, tensors, source) -> None:
    """Copy ``(hf_name, array, file)`` triples into an abstract model, checking every tensor.

    Arrays are converted to float32 one at a time. Raises :class:`CheckpointError` for a shape
    mismatch, an unknown tensor, a tensor with NaN or inf values, or a parameter that no tensor
    provided.
    """
    shapes = param_shapes(model)
    tied = getattr(model, "lm_head", "absent") is None
    seen = set()
    with _progress.current().steps(len(shapes), f"loading {os.path.basename(os.fspath(source))}",
                                   unit="tensor") as steps:
        for hf_name, array, file in tensors:
            if _fill_one(model, family, tied, shapes, hf_name, array, file, seen):
                steps.advance()
    missing = [n for n in shapes if n not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(source, f"missing tensors: {shown}")


def _fill_one(model, family: str, tied: bool, shapes: dict, hf_name: str, array, file, seen: set) -> bool:
    """Check one checkpoint tensor and copy it into ``model`` (see :func:`fill_model`); False for
    a tensor the model has no parameter for by design (e.g. a tied head's copy)."""
    name = hf_to_model_name(family, tied, hf_name)
    if name is None:
        return False
    if name not in shapes:
        raise CheckpointError(file, f"unexpected tensor {hf_name!r} for a {family} model")
    shape = tuple(array.shape)
    if is_transposed_in_hf(family, name):
        shape = shape[::-1]
    if shape != shapes[name]:
        raise CheckpointError(
            file,
            f"shape mismatch for {hf_name!r}: {tuple(array.shape)}, expected {shapes[name]}",
        )
    if isinstance(array, jax.Array):  # already on the device: no host round trip
        value = array.astype(jnp.float32)
    else:
        # Always an owned copy: handing JAX a view of a memory-mapped file made it
        # allocate far more than the tensor (seen: +1 GB for a 256-float norm).
        value = np.array(array, dtype=np.float32, copy=True)
    bad = int(jnp.sum(~jnp.isfinite(value))) if isinstance(value, jax.Array) else int(np.sum(~np.isfinite(value)))
    if bad:
        raise CheckpointError(
            file, f"tensor {hf_name!r} {tuple(array.shape)} holds {bad} non-finite values (NaN or inf)"
        )
    if is_transposed_in_hf(family, name):
        value = value.T
    set_param(model, name, value)
    seen.add(name)
    return True
