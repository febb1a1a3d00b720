"""Hugging Face folders: ``config.json`` + safetensors (single or sharded) in and out.

Loading accepts float32, float16 and bfloat16 tensors and computes in float32, whole or one
block at a time (``stream=True``). Saving writes sharded safetensors in the checkpoint's own
dtype that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (``_shards.py``); the
folder is built next to the target under a temporary name and renamed into place, so a failed
save never leaves a half-written folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings

import numpy as np

from fw_jax._files import new_folder_beside, replace_folder

from ._errors import BrokenInstallError, CheckpointError, UnsupportedModelError, config_problem
from ._loaded import (
    HF_ARCHITECTURES,
    LazyTensor,
    LoadedModel,
    build_abstract_model,
    fill_model,
    hf_to_model_name,
    stored_dtype_name,
)
from ._safetensors import SafetensorsFile

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def read_hf_config(folder: str | os.PathLike):
    """The ``transformers`` config of a folder, with errors that name the file."""
    import transformers

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(path, "no config.json in the checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"unreadable config: not UTF-8 ({e.reason} at byte {e.start}); "
                                    "expected a UTF-8 JSON file") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable config ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(path, "unreadable config: expected a JSON object")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(path, f"unknown architecture model_type={model_type!r}; "
                                          f"supported: {', '.join(HF_ARCHITECTURES)}")
    config_cls = config_class(model_type)  # an error here is the environment's, not the file's
    try:
        return config_cls.from_pretrained(folder)
    except config_errors() as e:  # transformers validates configs (huggingface_hub's strict dataclasses)
        raise CheckpointError(path, f"invalid {model_type} config: {config_problem(e)}") from e


def config_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which ``transformers`` says a config's values are invalid: anything else
    raised while reading one is not a problem of the user's file and is not reported as one."""
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's validation
    except ImportError:
        return errors
    return errors + (StrictDataclassError,)


def config_class(model_type: str):
    """``transformers``' config class for ``model_type`` (e.g. ``LlamaConfig`` for ``"llama"``).

    Importing it imports transformers' modelling helpers. When that fails, the Python environment
    is broken (e.g. a package that transformers imports, such as ``kernels``, at a version it does
    not support, left behind when pip downgraded transformers): raised as an ``ImportError`` that
    names the package and the versions, never as a problem of the checkpoint.
    """
    import transformers

    try:
        return transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise
    except Exception as e:
        raise BrokenInstallError(_broken_transformers(f"its {model_type} configuration", e)) from e


def _broken_transformers(what: str, error: Exception) -> str:
    """Why the installed transformers could not import ``what``: the package that raised
    ``error``, the versions of both and the range transformers declares for it, if any."""
    import importlib.metadata
    import re
    import traceback

    import transformers

    version = transformers.__version__
    raised = f"{type(error).__name__}: {str(error).rstrip('.')}"
    packages = [_package_of(frame.filename) for frame in reversed(traceback.extract_tb(error.__traceback__))]
    package = next((p for p in packages if p not in (None, "transformers")), None)
    if package is None:
        return (f"the installed transformers {version} cannot import {what} ({raised}). This is a problem of "
                "the Python environment, not of the model: reinstall transformers")
    message = f"the installed transformers {version} cannot import {what}: the {package} package raised {raised}"
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731  (PEP 503 names)
    try:
        installed = importlib.metadata.version(package)
        wanted = sorted({re.sub(r"\s", "", req.split(";")[0]) for req in importlib.metadata.requires("transformers") or ()
                         if norm(re.split(r"[^A-Za-z0-9_.-]", req, maxsplit=1)[0]) == norm(package)})
    except importlib.metadata.PackageNotFoundError:
        installed, wanted = None, []
    if installed is not None:
        message += f". Installed: {package} {installed}" + (
            f", and transformers {version} supports {' or '.join(wanted)}" if wanted else "")
    fix = f"pip install '{wanted[0]}'" if wanted else f"install a {package} that transformers {version} supports"
    return (message + f". This is a problem of the Python environment, not of the model: {fix}, "
            f"or pip uninstall {package} if nothing else needs it")


def _package_of(filename: str):
    """The top-level package a source file belongs to (under site-packages), or ``None``."""
    parts = os.path.normpath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return None



def safetensors_files(folder: str | os.PathLike) -> list[SafetensorsFile]:
    """The weight files of a folder: ``model.safetensors`` or the shards of its index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = dict.fromkeys(weight_map.values())
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError("the weight_map's values must be file names")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(index, f"unreadable shard index ({e})") from e
        files = []
        for shard in shards:
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(index, f"shard {shard!r} is missing")
            files.append(SafetensorsFile(shard_path))
        found = {k: f.path for f in files for k in f.keys()}
        for name, shard in weight_map.items():
            if name not in found:
                shard_path = os.path.join(folder, shard)
                raise CheckpointError(shard_path, f"missing tensor {name!r} listed in the index")
        return files
    if os.path.isfile(single):
        return [SafetensorsFile(single)]
    raise CheckpointError(folder, "no model.safetensors or model.safetensors.index.json")


def load_tokenizer(folder: str | os.PathLike, **kwargs):
    """``AutoTokenizer`` of a folder, or ``None`` (with a warning) when it has none or fails."""
    if not kwargs and not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # a model without a usable tokenizer is still a model
        warnings.warn(f"{folder}: tokenizer not loaded ({e})", stacklevel=2)
        return None


def load_hf_folder(folder: str | os.PathLike, *, tokenizer: bool = True, dtype: str | None = None,
                   stream: bool = False) -> LoadedModel:
    """Load a Hugging Face checkpoint folder into our Flax model.

    Tensors are read one at a time and converted to float32. With ``stream``, only the tensors
    outside the decoder blocks are read now; each block is read when :func:`load_block` asks
    for it, so the peak host memory is the embeddings, the head and one block, whatever the
    model's depth. ``dtype``: see :func:`fw_jax.models.load_model`.
    """
    folder = os.fspath(folder)
    config = read_hf_config(folder)
    model, family = build_abstract_model(config, os.path.join(folder, "config.json"))
    files = safetensors_files(folder)
    where = {}  # our parameter name -> (file, checkpoint name)
    for f in files:
        for name in f.keys():
            where[hf_to_model_name(family, name)] = (f, name)

    def read(name: str) -> np.ndarray:
        file, hf_name = where[name]
        return file.get(hf_name)

    def tensors():
        for f in files:
            for name in f.keys():
                yield name, LazyTensor(f.shape(name), functools.partial(f.get, name)), f.path, stored_dtype_name(f.dtype(name))

    loaded = fill_model(model, family, tensors(), folder, dtype=dtype, stream=read if stream else None,
                        config=config)
    loaded.tokenizer = load_tokenizer(folder) if tokenizer else None
    return loaded


def atomic_folder_write(out_dir: str | os.PathLike, write, *, overwrite: bool = False) -> str:
    """Run ``write(tmp_dir)`` on a fresh folder next to ``out_dir``, then rename it into place."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    tmp = new_folder_beside(out_dir)
    try:
        write(tmp)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_hf_folder(
    loaded: LoadedModel, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Write ``config.json``, sharded safetensors with their index, and the tokenizer to ``out_dir``.

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``. One
    shard per decoder block plus one for the rest (see ``_shards.py``), each tensor in its
    :meth:`LoadedModel.output_dtype` (the checkpoint's own: bfloat16 stays bfloat16). Tensors are
    streamed one at a time (a streamed model's blocks are read one at a time too), into a
    temporary folder that is renamed to ``out_dir`` only when complete. Returns the absolute
    path written.
    """

    return atomic_folder_write(out_dir, lambda tmp: write_hf_files(loaded, tmp), overwrite=overwrite)


def write_hf_files(loaded: LoadedModel, folder: str | os.PathLike, *, block_files=None) -> None:
    """Write the Hugging Face files of :func:`save_hf_folder` into an existing ``folder``;
    ``block_files`` (``{b: path}``) are block shards already written, linked in."""
    from ._shards import write_sharded_files

    write_sharded_files(loaded, folder, block_files=block_files)
