"""Flax checkpoints (``flax_model.msgpack``) as transformers 4.x Flax models saved them.

The file is ``flax.serialization.msgpack_serialize`` of the nested parameter dict, without the
``"params"`` level. Keys mirror the PyTorch names with ``/`` separators and Flax leaf names:

============================  ===========================  ===============================
Hugging Face (PyTorch)        Flax msgpack                 array
============================  ===========================  ===============================
``…embed_tokens.weight``      ``…/embed_tokens/embedding``  same ``(vocab, d)``
``…q_proj.weight`` (Linear)   ``…/q_proj/kernel``           transposed: ``(d_in, d_out)``
``…c_attn.weight`` (Conv1D)   ``…/c_attn/kernel``           transposed: ``(d_out, d_in)``
``…ln_1.weight`` (LayerNorm)  ``…/ln_1/scale``              same
``…norm.weight`` (RMSNorm)    ``…/norm/weight``             same
``…bias``                     ``…/bias``                    same
============================  ===========================  ===============================

So every ``kernel`` is the transpose of the PyTorch ``weight``: LLaMA's Dense kernels are
``(d_in, d_out)``, GPT-2's ``FlaxConv1D`` kernels ``(d_out, d_in)``. Checkpoints of a base model
(no ``model``/``transformer`` level) are accepted too.
"""

from __future__ import annotations

import os

import numpy as np

from ._errors import CheckpointError
from ._hf import (
    atomic_folder_write,
    load_tokenizer,
    read_hf_config,
)
from ._layers import Embedding, LayerNorm, Linear
from ._loaded import LoadedModel, build_abstract_model, fill_model, stored_dtype_name
from ._params import resolve
from ._shards import config_for_saving, extra_items, tensor_items

FLAX_FILE = "flax_model.msgpack"
_BASE_PREFIX = {"gpt2": "transformer"}  #: the base model's attribute, where it is not ``model``


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict):
            yield from _flatten(value, path)
        else:
            yield path, value


def _flax_to_hf(path: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    *module, leaf = path
    if leaf == "kernel":
        return ".".join(module + ["weight"]), np.asarray(array).T
    if leaf in ("embedding", "scale"):
        return ".".join(module + ["weight"]), array
    return ".".join(path), array


def read_flax_params(path: str | os.PathLike) -> dict:
    """The nested parameter dict of a ``flax_model.msgpack`` (errors name the file)."""
    from flax import serialization

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated exception types on bad bytes
        raise CheckpointError(
            path, f"corrupted or truncated Flax msgpack ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(tree, dict):
        raise CheckpointError(path, "Flax msgpack does not hold a parameter dict")
    if set(tree) == {"params"}:
        tree = tree["params"]
    return tree


def load_flax_folder(folder: str | os.PathLike, *, tokenizer: bool = True, dtype: str | None = None) -> LoadedModel:
    """Load a folder with ``config.json`` and ``flax_model.msgpack`` into our model (``dtype``: see
    :func:`fw_jax.models.load_model`)."""
    folder = os.fspath(folder)
    config = read_hf_config(folder)
    model, family = build_abstract_model(config, os.path.join(folder, "config.json"))
    file = os.path.join(folder, FLAX_FILE)
    tree = read_flax_params(file)
    prefix = _BASE_PREFIX.get(family, "model")
    if prefix not in tree:
        tree = {prefix: tree}

    def tensors():
        for path, array in _flatten(tree):
            name, value = _flax_to_hf(path, array)
            yield name, value, file, stored_dtype_name(np.asarray(value).dtype)

    loaded = fill_model(model, family, tensors(), file, dtype=dtype, config=config)
    loaded.source = folder
    loaded.tokenizer = load_tokenizer(folder) if tokenizer else None
    return loaded


def _hf_to_flax(model, name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    *module, leaf = name.split(".")
    layer = resolve(model, ".".join(module))
    if leaf == "weight":
        if isinstance(layer, Linear):
            return tuple(module) + ("kernel",), array.T
        if isinstance(layer, Embedding):
            return tuple(module) + ("embedding",), array
        if isinstance(layer, LayerNorm):
            return tuple(module) + ("scale",), array
    return tuple(name.split(".")), array


def flax_params(loaded: LoadedModel) -> dict:
    """Our weights as the nested dict a transformers 4.x Flax model expects (numpy views), and
    the checkpoint's tensors the model does not compute with (:attr:`LoadedModel.extras`)
    unchanged, at the path of their dotted name."""
    tree: dict = {}
    items = [(name, get, True) for name, _, _, get in tensor_items(loaded, dtype=np.float32)]
    items += [(name, get, False) for name, _, _, get in extra_items(loaded)]
    for name, get, ours in items:
        path, value = _hf_to_flax(loaded.model, name, get()) if ours else (tuple(name.split(".")), get())
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value)
    return tree


def save_flax_folder(
    loaded: LoadedModel, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Write ``config.json`` + ``flax_model.msgpack`` (+ tokenizer), atomically, to ``out_dir``.

    The msgpack bytes are the one extra copy of the weights held while saving.
    """
    return atomic_folder_write(out_dir, lambda tmp: write_flax_files(loaded, tmp), overwrite=overwrite)


def write_flax_files(loaded: LoadedModel, folder: str | os.PathLike, *, block_files=None) -> None:
    """Write the files of :func:`save_flax_folder` (float32, as transformers 4.x Flax models are
    saved) into an existing ``folder``. ``block_files`` is not used: the one msgpack file is
    written from the model in memory."""
    from flax import serialization

    if loaded.streamed:
        raise ValueError(f"{loaded.source} was loaded with stream=True; a Flax msgpack holds the whole "
                         "model in one file, so load it without stream to save it as Flax")
    config = config_for_saving(loaded, np.float32)
    config.architectures = ["Flax" + config.architectures[0]]
    config.save_pretrained(folder)
    data = serialization.msgpack_serialize(flax_params(loaded))
    with open(os.path.join(folder, FLAX_FILE), "wb") as f:
        f.write(data)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
