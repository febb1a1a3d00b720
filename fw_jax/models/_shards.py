"""Hugging Face folders written as sharded safetensors, one decoder block per shard.

The layout transformers reads (``save_pretrained`` writes the same kind)::

    config.json
    model-00001-of-00034.safetensors      # embeddings, final norm, LM head
    model-00002-of-00034.safetensors      # block 0
    ...
    model-00034-of-00034.safetensors      # block 31
    model.safetensors.index.json          # {"metadata": {"total_size"}, "weight_map": {name: file}}

One shard per block means a block can be written the moment it is pruned, from memory that
holds only that block, and that the pruning checkpoints (``OUT.partial/block_0003.safetensors``)
are the shards themselves: the finished folder links them in rather than copying them. Every
tensor is written in its :meth:`LoadedModel.output_dtype`: a bfloat16 checkpoint stays
bfloat16, and a tensor that was not pruned is bit-identical to the input's.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from typing import Mapping, Optional

import numpy as np

from fw_jax import _progress

from ._errors import CheckpointError
from ._loaded import (
    HF_ARCHITECTURES, LoadedModel, _count_nonfinite, block_prefix, is_block_param, is_resident,
    is_transposed_in_hf, resident_block,
)
from ._params import get_param, param_shapes
from ._safetensors import WriteError, write_safetensors

INDEX_NAME = "model.safetensors.index.json"

__all__ = ["INDEX_NAME", "block_shard_name", "check_sharded_folder", "read_block_shard", "write_block_shard",
           "write_sharded_files"]


def shard_count(loaded: LoadedModel) -> int:
    """Shards of the folder: one for the tensors outside the blocks, one per block."""
    return len(loaded.model.blocks) + 1


def block_shard_name(b: int, shards: int) -> str:
    """File name of block ``b``'s shard in a folder of ``shards`` shards."""
    return f"model-{b + 2:05d}-of-{shards:05d}.safetensors"


def tensor_items(loaded: LoadedModel, names=None, dtype=None) -> list:
    """``(name, shape, dtype, get_array)`` of parameters ``names`` (default: all) in Hugging Face
    layout (lazy), in each one's output dtype or in ``dtype``."""
    shapes = param_shapes(loaded.model)
    items = []
    for name in shapes if names is None else names:
        transposed = is_transposed_in_hf(loaded.family, name)
        shape = shapes[name][::-1] if transposed else shapes[name]

        def get(name=name, transposed=transposed):
            if loaded.streamed and not is_resident(loaded, name):  # dropped while pruning: read it again
                return loaded.store(name)  # already in Hugging Face's layout
            value = np.asarray(get_param(loaded.model, name), dtype=np.float32)
            return value.T if transposed else value

        items.append((name, shape, loaded.output_dtype(name) if dtype is None else np.dtype(dtype), get))
    return items


def extra_items(loaded: LoadedModel) -> list:
    """``(name, shape, dtype, get_array)`` of the checkpoint's tensors the model does not compute
    with (:attr:`LoadedModel.extras`, e.g. ``rotary_emb.inv_freq``): written back as they were
    stored, same name, dtype and bytes."""
    return [(t.name, t.shape, t.dtype, t.read) for t in loaded.extras.values()]


def _block_names(loaded: LoadedModel, b: int) -> list[str]:
    prefix = block_prefix(loaded.model, b)
    return [n for n in param_shapes(loaded.model) if n.startswith(prefix)]


def _rest_names(loaded: LoadedModel) -> list[str]:
    return [n for n in param_shapes(loaded.model) if not is_block_param(loaded.model, n)]


def write_block_shard(loaded: LoadedModel, b: int, path: str | os.PathLike) -> None:
    """Write block ``b``'s parameters (it must be in memory) to ``path``, atomically: a synced
    temporary file renamed into place, so ``path`` is whole or absent."""
    _write_atomic(os.fspath(path), tensor_items(loaded, _block_names(loaded, b)), {"format": "pt"})


def read_block_shard(loaded: LoadedModel, path: str | os.PathLike, b: Optional[int] = None) -> dict[str, np.ndarray]:
    """The tensors of a block shard written by :func:`write_block_shard` (Hugging Face layout).

    With ``b``, the shard must hold exactly block ``b``'s tensors, each with its shape and output
    dtype and only finite values; :class:`CheckpointError` names the file and what is wrong."""
    from ._safetensors import SafetensorsFile

    file = SafetensorsFile(path)
    tensors = {name: file.get(name) for name in file.keys()}
    if b is not None:
        _check_tensors(os.fspath(path), {name: (file.shape(name), file.dtype(name)) for name in tensors},
                       tensor_items(loaded, _block_names(loaded, b)), f"of block {b}", f"not one of block {b}'s")
        for name, value in tensors.items():
            bad = _count_nonfinite(value)
            if bad:
                raise CheckpointError(path, f"tensor {name!r} {tuple(value.shape)} holds {bad} non-finite values "
                                            "(NaN or inf)")
    return tensors


def _check_tensors(path: str, found: Mapping[str, tuple], expected: list, missing_is: str, extra_is: str) -> None:
    """Raise :class:`CheckpointError` unless ``found`` (``{name: (shape, dtype)}``, read from
    ``path``) holds the tensors ``expected`` (``tensor_items``), with their shapes and dtypes, and
    no other; the message says ``missing tensor 'NAME' {missing_is}`` or ``holds tensor 'NAME',
    {extra_is}``."""
    want = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype, _ in expected}
    missing, extra = [n for n in want if n not in found], sorted(n for n in found if n not in want)
    if missing:
        raise CheckpointError(path, f"missing tensor {missing[0]!r} {missing_is}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(path, f"holds tensor {extra[0]!r}, {extra_is}")
    for name, (shape, dtype) in want.items():
        if (tuple(found[name][0]), np.dtype(found[name][1])) != (shape, dtype):
            raise CheckpointError(path, f"tensor {name!r} is {tuple(found[name][0])} {np.dtype(found[name][1])}, "
                                        f"expected {shape} {dtype}")


def check_sharded_folder(loaded: LoadedModel, folder: str | os.PathLike) -> None:
    """Check a folder :func:`write_sharded_files` wrote for ``loaded``, reading headers only: its
    index lists every parameter of the model and nothing else, and every shard it names exists and
    holds exactly the tensors the index assigns to it, each with its shape (Hugging Face layout)
    and output dtype.

    Raises:
      CheckpointError: naming the index or the shard and what is wrong (a damaged header, a
        missing tensor listed in the index, a wrong shape).
    """
    from ._safetensors import SafetensorsFile

    folder = os.fspath(folder)
    index = os.path.join(folder, INDEX_NAME)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise TypeError("weight_map is not a mapping of names to files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(index, f"unreadable shard index ({e})") from e
    items = tensor_items(loaded) + extra_items(loaded)  # the parameters and the tensors carried over
    listed = set(weight_map)
    missing = [name for name, *_ in items if name not in listed]
    if missing:
        raise CheckpointError(index, f"does not list tensor {missing[0]!r} of the model"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(listed - {name for name, *_ in items})
    if extra:
        raise CheckpointError(index, f"lists tensor {extra[0]!r}, which the model does not have")
    by_shard: dict[str, list] = {}
    for item in items:
        by_shard.setdefault(weight_map[item[0]], []).append(item)
    for shard, expected in by_shard.items():
        path = os.path.join(folder, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(path):
            raise CheckpointError(index, f"shard {shard!r} is missing")
        file = SafetensorsFile(path)
        _check_tensors(path, {name: (file.shape(name), file.dtype(name)) for name in file.keys()}, expected,
                       "listed in the index", "which the index does not list in this shard")


def _write_atomic(path: str, items: list, metadata: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_safetensors(tmp, items, metadata, progress=False, fsync=True)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # name the file being written, not its temporary
            cause = e.__cause__ if isinstance(e, WriteError) and isinstance(e.__cause__, OSError) else e
            raise WriteError(path, cause) from cause
        raise


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` becomes ``src``'s content without a second copy on disk where the file system
    allows (a hard link), else by copying."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise WriteError(dst, e) from e
        try:
            shutil.copyfile(src, dst)
        except OSError as e2:
            raise WriteError(dst, e2) from e2


def config_for_saving(loaded: LoadedModel, dtype=None):
    """A copy of the config with what ``AutoModelForCausalLM`` needs: the class name, and
    ``dtype`` or else the dtype most of the weights are written in."""
    config = copy.deepcopy(loaded.config)
    config.architectures = [HF_ARCHITECTURES[config.model_type]]
    dtypes = [loaded.output_dtype(name).name for name in param_shapes(loaded.model)]
    config.dtype = np.dtype(dtype).name if dtype is not None else (
        max(set(dtypes), key=dtypes.count) if dtypes else "float32")
    return config


def write_sharded_files(loaded: LoadedModel, folder: str | os.PathLike, *,
                        block_files: Optional[Mapping[int, str]] = None) -> None:
    """Write ``config.json``, the shards, their index and the tokenizer into an existing ``folder``.

    The first shard holds the tensors outside the blocks and, unchanged, the checkpoint's tensors
    the model does not compute with (:func:`extra_items`).

    Args:
      loaded: the model; a streamed model's blocks are read one at a time.
      folder: where to write (a temporary folder the caller renames into place).
      block_files: ``{b: path}`` of blocks already written by :func:`write_block_shard` (the
        pruning checkpoints): linked in instead of written again.

    Raises:
      WriteError (an ``OSError``): a file could not be written (e.g. the disk is full); the
      message names it.
    """
    folder = os.fspath(folder)
    block_files = dict(block_files or {})
    shards = shard_count(loaded)
    weight_map, total = {}, 0
    try:
        config_for_saving(loaded).save_pretrained(folder)
    except OSError as e:
        raise WriteError(os.path.join(folder, "config.json"), e) from e
    blocks = len(loaded.model.blocks)
    with _progress.current().steps(shards, "saving the model", unit="shard") as steps:
        rest = tensor_items(loaded, _rest_names(loaded)) + extra_items(loaded)
        first = f"model-00001-of-{shards:05d}.safetensors"
        _write_atomic(os.path.join(folder, first), rest, {"format": "pt"})
        steps.advance()
        for b in range(blocks):
            path = os.path.join(folder, block_shard_name(b, shards))
            if b in block_files:
                _link_or_copy(block_files[b], path)
            else:
                with resident_block(loaded, b):
                    write_block_shard(loaded, b, path)
            steps.advance()
        for b in range(blocks):
            for item in tensor_items(loaded, _block_names(loaded, b)):
                weight_map[item[0]] = block_shard_name(b, shards)
                total += int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
        for item in rest:
            weight_map[item[0]] = first
            total += int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_atomic_text(os.path.join(folder, INDEX_NAME), json.dumps(index, indent=2))
    if loaded.tokenizer is not None:
        try:
            loaded.tokenizer.save_pretrained(folder)
        except OSError as e:
            raise WriteError(folder, e) from e


def _write_atomic_text(path: str, text: str) -> None:
    from fw_jax._files import atomic_write

    try:
        atomic_write(path, text)
    except OSError as e:
        raise WriteError(path, e) from e
