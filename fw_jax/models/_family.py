"""One record per model family: what fw_jax needs to know about it, in one place.

A family's model file (``_llama.py``, ``_gpt2.py``, ``_gemma2.py``, ``_gemma3.py``, ``_phi3.py``,
``_mixtral.py``, ``_qwen3_moe.py``) ends with its ``FAMILY``
record; :data:`FAMILIES` in ``_loaded.py`` lists them. Adding a family is a new model file with
its record, and its name in that list.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Family:
    """What fw_jax needs to know about one model family.

    Attributes:
      name: ``"llama"``, ``"gpt2"``, ``"gemma3"``, ... (the keys of :data:`FAMILIES`).
      architectures: ``{model_type: transformers class}`` for every ``transformers`` config type
        this family's model runs (the class is written to a saved ``config.json``).
      spec: the dataclass read from a config (``spec.from_hf(config)``).
      model: the Flax NNX model class (``model(spec)``).
      bos_per_window: perplexity and calibration windows must start with BOS (Gemma: 21.8 with,
        61.4 without on pydoc-eval).
      transposed: suffixes of weights Hugging Face stores as ``(d_in, d_out)`` (GPT-2's Conv1D).
      optional_prefix: a prefix some checkpoints leave out of the tensor names (the original
        ``gpt2`` checkpoints have ``h.0...`` for ``transformer.h.0...``).
      buffers: suffixes of checkpoint tensors that are buffers, not weights: values the model
        derives from its config (RoPE frequencies, GPT-2's causal mask), which ``transformers``
        ignores when loading too. They are not read, and are written back unchanged.
      embedding: our name of the token embedding (what a tied head computes with).
      recover_warning: why ``--recover`` is known to harm this family (``""``: not known to); the
        pipeline warns with it when recovery is asked for.
    """

    name: str
    architectures: Mapping[str, str]
    spec: type
    model: type
    bos_per_window: bool = False
    transposed: tuple[str, ...] = ()
    optional_prefix: str = ""
    buffers: tuple[str, ...] = ("rotary_emb.inv_freq",)
    embedding: str = "model.embed_tokens.weight"
    recover_warning: str = ""

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)

    def is_buffer(self, hf_name: str) -> bool:
        """Whether a checkpoint tensor is one of the family's :attr:`buffers`."""
        return hf_name.endswith(self.buffers)

    def param_name(self, hf_name: str) -> str:
        """Our parameter name for a checkpoint tensor name (the name itself, or with the
        :attr:`optional_prefix` the checkpoint left out)."""
        if self.optional_prefix and not hf_name.startswith((self.optional_prefix, "lm_head.")):
            return self.optional_prefix + hf_name
        return hf_name

    def is_transposed(self, name: str) -> bool:
        """Whether Hugging Face stores parameter ``name`` as ``(d_in, d_out)``."""
        return bool(self.transposed) and name.endswith(self.transposed)
