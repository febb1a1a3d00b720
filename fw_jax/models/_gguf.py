"""GGUF files (llama.cpp) into our LLaMA-family and Gemma 3 models, dequantized to float32.

The file is parsed by :class:`~fw_jax.models._gguf_file.GGUFFile`; the config is rebuilt from
the GGUF metadata (``{arch}.block_count``, ``...embedding_length``, ``...rope.freq_base``, ...).
Tensors are renamed from llama.cpp names (``blk.3.attn_q.weight``)
to Hugging Face names and dequantized one at a time with ``gguf.quants.dequantize``.

llama.cpp's converter permutes the rows of LLaMA's q/k projections so that RoPE rotates
adjacent pairs ``(2i, 2i+1)``; Hugging Face rotates halves ``(i, i + d/2)``. Within each head,
GGUF row ``2i + s`` holds HF row ``s·d/2 + i``; :func:`unpermute_rope_rows` undoes it. Qwen2
GGUF files are not permuted. Gemma 3 GGUF files store RMSNorm weights as ``1 + w`` (llama.cpp
multiplies by the weight directly); loading subtracts the 1 again.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import reprlib
import warnings
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from ._errors import CheckpointError, UnsupportedModelError, config_problem
from ._gguf_file import GGUFFile, GGUFTensorInfo
from ._loaded import LazyTensor, LoadedModel, build_abstract_model, fill_model

_ARCH_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
_PERMUTED_ARCHS = ("llama",)
# llama.cpp hard-codes Gemma 3's layer pattern: every 6th layer has global attention.
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """Hugging Face name of a llama.cpp tensor name; ``None`` for tensors we do not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    block_names = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
    match = _BLOCK_RE.match(name)
    if match and match.group(2) in block_names:
        block, kind, suffix = match.groups()
        return f"model.layers.{block}.{block_names[kind]}.{suffix}"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent-pair RoPE → rotate-half RoPE).

    ``weight`` is ``(n_heads·head_dim, ...)`` (a weight or a bias); returns the same shape.
    """
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    w = weight.reshape(n_heads, head_dim // 2, 2, *rest)
    return np.swapaxes(w, 1, 2).reshape(weight.shape)


class _Form(NamedTuple):
    """What a GGUF metadata value must be: described for errors, tested, converted."""

    description: str
    valid: Callable[[Any], bool]
    convert: type


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_integer(value) or isinstance(value, float)) and math.isfinite(value)


_COUNT = _Form("a positive integer", lambda v: _is_integer(v) and v > 0, int)
_TOKEN_ID = _Form("a non-negative integer", lambda v: _is_integer(v) and v >= 0, int)
_POSITIVE = _Form("a positive number", lambda v: _is_number(v) and v > 0, float)
_STRING = _Form("a string", lambda v: isinstance(v, str), str)


def _field(reader: GGUFFile, path: str, key: str, form: _Form = _STRING, default=None):
    """Metadata value ``key`` of the GGUF file ``path``, converted to ``form``; ``default`` when
    absent (``None``: required). A missing or malformed value is a :class:`CheckpointError`
    naming the file, the key and the form expected."""
    if key not in reader.metadata:
        if default is None:
            raise CheckpointError(path, f"GGUF metadata {key!r} is missing; expected {form.description}")
        return default
    value = reader.metadata[key]
    if not form.valid(value):
        problem = f"GGUF metadata {key!r} is {reprlib.repr(value)}; expected {form.description}"
        raise CheckpointError(path, problem)
    return form.convert(value)


def gguf_config(reader: GGUFFile, path: str):
    """A ``transformers`` config built from the GGUF metadata."""
    from ._hf import config_class

    arch = _field(reader, path, "general.architecture")
    if arch not in _ARCH_MODEL_TYPE:
        supported = ", ".join(_ARCH_MODEL_TYPE)
        raise UnsupportedModelError(
            path, f"unsupported GGUF architecture {arch!r} (supported: {supported})"
        )
    tensor_names = {t.name for t in reader.tensors}
    heads = _field(reader, path, f"{arch}.attention.head_count", _COUNT)
    hidden = _field(reader, path, f"{arch}.embedding_length", _COUNT)
    base = _field(reader, path, f"{arch}.rope.freq_base", _POSITIVE, 10000.0)
    rope = {"rope_type": "default", "rope_theta": base}
    scaling = _field(reader, path, f"{arch}.rope.scaling.type", _STRING, "none")
    if scaling == "linear":
        rope.update(
            rope_type="linear", factor=_field(reader, path, f"{arch}.rope.scaling.factor", _POSITIVE)
        )
    elif scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            path, f"GGUF rope scaling {scaling!r} / rope_freqs is not supported"
        )
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise CheckpointError(path, "missing tensors: token_embd.weight")
    vocab = _field(reader, path, f"{arch}.vocab_size", _COUNT, int(embd.shape[0]))
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_field(reader, path, f"{arch}.feed_forward_length", _COUNT),
        num_hidden_layers=_field(reader, path, f"{arch}.block_count", _COUNT),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, path, f"{arch}.attention.head_count_kv", _COUNT, heads),
        rms_norm_eps=_field(reader, path, f"{arch}.attention.layer_norm_rms_epsilon", _POSITIVE),
        max_position_embeddings=_field(reader, path, f"{arch}.context_length", _COUNT, 2048),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, path, "tokenizer.ggml.bos_token_id", _TOKEN_ID, -1),
        eos_token_id=_field(reader, path, "tokenizer.ggml.eos_token_id", _TOKEN_ID, -1),
    )
    kwargs = {k: v for k, v in kwargs.items() if v != -1}
    if arch == "llama":
        head_dim = _field(reader, path, "llama.attention.key_length", _COUNT, hidden // heads)
        return config_class("llama")(head_dim=head_dim, **kwargs)
    if arch == "gemma3":
        head_dim = _field(reader, path, "gemma3.attention.key_length", _COUNT, hidden // heads)
        layers = kwargs["num_hidden_layers"]
        kwargs["rope_parameters"] = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_BASE},
        }
        return config_class("gemma3_text")(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=_field(reader, path, "gemma3.attention.sliding_window", _COUNT),
            layer_types=[
                "full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
                for i in range(layers)
            ],
            **kwargs,
        )
    return config_class("qwen2")(**kwargs)


def _dequantize(reader: GGUFFile, tensor: GGUFTensorInfo, rows_per_chunk: int = 8192) -> np.ndarray:
    """Dequantize a GGUF tensor to float32 of its numpy shape, a block of rows at a time.

    Working by rows bounds the temporaries of ``gguf.quants.dequantize`` (several float arrays
    of the chunk's size) instead of several copies of a whole embedding table.
    """
    import gguf

    shape, data = tensor.shape, reader.raw(tensor)
    if len(shape) < 2:  # copy: never hand a view of the memory map onwards
        return np.array(gguf.quants.dequantize(data, tensor.ggml_type), dtype=np.float32).reshape(
            shape
        )
    rows = data.shape[0] if data.ndim == 2 and data.shape[0] == shape[0] else None
    if rows is None:  # 3-D or more: no chunking
        out = np.array(gguf.quants.dequantize(data, tensor.ggml_type), dtype=np.float32)
        return out.reshape(shape)
    out = np.empty(shape, dtype=np.float32)
    for start in range(0, rows, rows_per_chunk):
        chunk = gguf.quants.dequantize(data[start : start + rows_per_chunk], tensor.ggml_type)
        out[start : start + rows_per_chunk] = np.asarray(chunk, dtype=np.float32).reshape(
            -1, *shape[1:]
        )
    return out


def _gguf_value(reader: GGUFFile, tensor: GGUFTensorInfo, name: str, path: str, config, arch: str) -> np.ndarray:
    """Tensor ``tensor`` (our name ``name``) dequantized to float32 in Hugging Face's layout."""
    try:
        value = _dequantize(reader, tensor)
    except Exception as e:
        raise CheckpointError(
            path, f"cannot dequantize {tensor.name!r} ({type(e).__name__}: {e})"
        ) from e
    if arch in _PERMUTED_ARCHS and name.endswith(("q_proj.weight", "q_proj.bias")):
        value = unpermute_rope_rows(value, config.num_attention_heads)
    elif arch in _PERMUTED_ARCHS and name.endswith(("k_proj.weight", "k_proj.bias")):
        value = unpermute_rope_rows(value, config.num_key_value_heads)
    elif arch == "gemma3" and name.endswith("norm.weight"):
        value = value - np.float32(1.0)
    return value


def _gguf_tensors(reader: GGUFFile, path: str, config, arch: str, lazy: bool = False):
    """Every tensor of the file as ``(name, LazyTensor, path, stored dtype)``, under its Hugging
    Face name, or its own name when it has none here (then the loader refuses it, naming it).
    ``lazy``: reading gives the host array; else a device array (the host copy is dropped at
    once, before the next tensor is made)."""
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name, arch)
        if name is None:
            read_raw = lambda tensor=tensor: _dequantize(reader, tensor)  # noqa: E731
            yield tensor.name, LazyTensor(tensor.shape, read_raw), path, _stored_name(tensor.ggml_type)
            continue

        def read(tensor=tensor, name=name):
            value = _gguf_value(reader, tensor, name, path, config, arch)
            return value if lazy else jax.device_put(value)

        yield name, LazyTensor(tensor.shape, read), path, _stored_name(tensor.ggml_type)


def _stored_name(ggml_type: int) -> str:
    """``"float32"``/``"float16"``/``"bfloat16"`` for GGUF's float types, else the quantization
    name (``"Q4_1"``), which :func:`~fw_jax.models._loaded.output_dtype` writes as bfloat16."""
    import gguf

    name = gguf.GGMLQuantizationType(ggml_type).name
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(name, name)


def load_gguf(path: str | os.PathLike, *, tokenizer: bool = True, dtype: str | None = None,
              stream: bool = False) -> LoadedModel:
    """Load a llama.cpp GGUF file (LLaMA, Qwen2 or Gemma 3 architecture) into our Flax model.

    The tokenizer comes from the GGUF metadata via ``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)``; pass ``tokenizer=False`` to skip it (it takes a few seconds). ``dtype``:
    see :func:`fw_jax.models.load_model`. ``stream``: the blocks are dequantized when
    :func:`~fw_jax.models.load_block` asks for them, from the file's memory map.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    from ._hf import config_errors

    reader = GGUFFile(path)
    try:
        config = gguf_config(reader, path)
    except CheckpointError:
        raise
    except config_errors() as e:  # transformers' own config validation (an ImportError is the environment's)
        raise CheckpointError(path, f"invalid model metadata: {config_problem(e)}") from e
    model, family = build_abstract_model(config, path)
    arch = _field(reader, path, "general.architecture")
    if stream:
        by_name = {gguf_to_hf_name(t.name, arch): t for t in reader.tensors}

        def read(name: str) -> np.ndarray:  # keeps the file's memory map open while the model lives
            return _gguf_value(reader, by_name[name], name, path, config, arch)

        loaded = fill_model(model, family, _gguf_tensors(reader, path, config, arch, lazy=True), path,
                            dtype=dtype, stream=read, config=config)
    else:
        loaded = fill_model(model, family, _gguf_tensors(reader, path, config, arch), path, dtype=dtype,
                            config=config)
        del reader
    loaded.tokenizer = gguf_tokenizer(path) if tokenizer else None
    return loaded


def gguf_tokenizer(path: str):
    """The tokenizer a GGUF file describes, or ``None`` (with a warning) when it cannot be built.

    ``transformers`` builds it with ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``,
    but reads the metadata with a reader that imports torch. Without torch (only a test
    dependency of fw_jax) the vocabulary is read with the ``gguf`` package and handed to
    transformers' own GGUF tokenizer converter, so both paths build the same tokenizer.
    """
    if importlib.util.find_spec("torch") is None:
        try:
            return _tokenizer_from_metadata(path)
        except Exception as e:  # a model without a usable tokenizer is still a model
            warnings.warn(f"{path}: tokenizer not loaded ({type(e).__name__}: {e})", stacklevel=2)
            return None
    from ._hf import load_tokenizer

    return load_tokenizer(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))


def _tokenizer_from_metadata(path: str):
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}
    del reader

    def renamed(group):
        return {new: meta[f"tokenizer.{old}"] for old, new in mapping.GGUF_TOKENIZER_MAPPING[group].items()
                if f"tokenizer.{old}" in meta}

    vocabulary, options = renamed("tokenizer"), renamed("tokenizer_config")
    if vocabulary.get("tokenizer_type") == "llama":  # sentencepiece files without the flag add BOS
        options.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None:
            options[name] = vocabulary["tokens"][int(index)]
    backend, _ = mapping.convert_gguf_tokenizer(meta["general.architecture"], vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)
