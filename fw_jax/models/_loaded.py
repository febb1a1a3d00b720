"""The loaded-model record and the family dispatch shared by all loaders."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fw_jax import _progress

from ._errors import CheckpointError, CheckpointNote, UnsupportedModelError
from ._family import Family
from ._gemma2 import FAMILY as GEMMA2
from ._gemma3 import FAMILY as GEMMA3
from ._gpt2 import FAMILY as GPT2
from ._llama import FAMILY as LLAMA
from ._mixtral import FAMILY as MIXTRAL
from ._phi3 import FAMILY as PHI3
from ._qwen3_moe import FAMILY as QWEN3_MOE
from ._params import param_shapes, set_param

#: Every model family, by name (see ``_family.py``; a new family adds its record here).
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2, GEMMA3, GEMMA2, PHI3, MIXTRAL, QWEN3_MOE)}

# transformers class names written to config.json so AutoModelForCausalLM finds the model.
HF_ARCHITECTURES = {t: cls for f in FAMILIES.values() for t, cls in f.architectures.items()}


#: The dtypes a checkpoint is written in (``--dtype``); ``"auto"`` keeps each tensor's own.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


def output_dtype(stored: str, requested: Optional[str] = "auto") -> np.dtype:
    """The dtype a tensor stored as ``stored`` is written in: ``requested``, or with ``"auto"``
    its own dtype, except that quantized tensors (a GGUF ``Q4_1``) become bfloat16."""
    if requested in (None, "auto"):
        return _FLOAT_DTYPES.get(stored, _FLOAT_DTYPES["bfloat16"])
    if requested not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {requested!r}")
    return _FLOAT_DTYPES[requested]


def stored_dtype_name(dtype) -> str:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` for a numpy dtype (others by their name)."""
    return np.dtype(dtype).name


@dataclasses.dataclass
class LoadedModel:
    """A model with everything needed to run, prune and save it: what :func:`load_model` returns.

    Attributes:
      model: the Flax NNX module, of its family's ``model`` class (``LlamaForCausalLM``,
        ``GPT2LMHeadModel`` or ``Gemma3ForCausalLM``); its parameters are float32 arrays, or
        shapes only (``jax.ShapeDtypeStruct``) while a streamed model has not read them.
      config: the ``transformers`` config it was built from (for a GGUF, rebuilt from the
        metadata); saving writes it too.
      tokenizer: a ``transformers`` tokenizer, or ``None`` when none was asked for, or the
        checkpoint has none or an unusable one (with a warning).
      family: the name of its :data:`FAMILIES` record: ``"llama"`` (LLaMA, Mistral, Qwen2,
        Qwen3, SmolLM2), ``"gpt2"``, ``"gemma3"``, ``"gemma2"``, ``"phi3"``, ...
      source: the path it was loaded from.
      dtypes: ``{parameter name: its dtype in the checkpoint}`` (``"bfloat16"``, ``"float16"``,
        ``"float32"``, or a GGUF quantization such as ``"Q4_1"``); a name not in it is float32.
      dtype: what the values were rounded to when loaded (see :func:`load_model`): ``None``
        (exactly the stored values), ``"auto"`` (each to its :meth:`output_dtype`) or a dtype
        name (all to it).
      store: for a streamed model (``load_model(..., stream=True)``), reads one parameter from the
        checkpoint by name, in Hugging Face's layout; ``None``: everything is in memory.
      extras: ``{Hugging Face name: StoredTensor}`` of the checkpoint's tensors that the model does
        not compute with (buffers such as ``rotary_emb.inv_freq``, see :func:`fill_model`); the
        writers copy them into the output unchanged.

    A streamed model (:attr:`streamed`) holds a decoder block only between :func:`load_block`
    and :func:`unload_block` (``with resident_block(loaded, b)``); :func:`unload_rest` drops the
    other parameters and :func:`load_rest` reads them again. For a model all in memory these do
    nothing, except that ``load_block(loaded, b, tensors)`` still writes ``tensors``.
    """

    model: nnx.Module
    config: Any
    tokenizer: Any
    family: str
    source: str = ""
    dtypes: dict = dataclasses.field(default_factory=dict)
    dtype: Optional[str] = None
    store: Optional[Callable[[str], Any]] = None
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        """Whether the decoder blocks are read from the checkpoint (:attr:`store`) one at a time."""
        return self.store is not None

    def output_dtype(self, name: str) -> np.dtype:
        """The dtype parameter ``name`` is saved in unless the writer is given one:
        ``output_dtype(its stored dtype, self.dtype)`` (:func:`output_dtype`)."""
        return output_dtype(self.dtypes.get(name, "float32"), self.dtype)


class LazyTensor:
    """A checkpoint tensor whose ``shape`` is known without reading it; calling it reads it."""

    def __init__(self, shape, read: Callable[[], Any]):
        self.shape, self.read = tuple(shape), read

    def __call__(self):
        return self.read()


def block_prefix(model: nnx.Module, b: int) -> str:
    """``"model.layers.3."``: what the names of block ``b``'s parameters start with."""
    return f"{model.block_path}.{b}."


def is_block_param(model: nnx.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a decoder block (pruning touches only those)."""
    return name.startswith(model.block_path + ".")


def load_block(loaded: LoadedModel, b: int, tensors: Optional[dict] = None) -> None:
    """Read block ``b``'s parameters from the checkpoint into a streamed model (a no-op when the
    model is all in memory). ``tensors`` (``{name: array}``, Hugging Face layout) take precedence
    over the checkpoint: a pruned block read back from its shard."""
    if not loaded.streamed:
        if tensors:
            for name, value in tensors.items():
                _set_checked(loaded, name, value, "")
        return
    prefix = block_prefix(loaded.model, b)
    for name in param_shapes(loaded.model):
        if name.startswith(prefix):
            value = tensors[name] if tensors and name in tensors else loaded.store(name)
            _set_checked(loaded, name, value, loaded.source)


def unload_block(loaded: LoadedModel, b: int) -> None:
    """Drop block ``b``'s parameters of a streamed model (back to shapes only); a no-op otherwise."""
    if not loaded.streamed:
        return
    prefix = block_prefix(loaded.model, b)
    for path, var in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
        if ".".join(str(p) for p in path).startswith(prefix):
            value = var.get_value()
            var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype))


def unload_rest(loaded: LoadedModel) -> None:
    """Drop the parameters outside the blocks (embeddings, final norm, head) of a streamed model;
    pruning does once the calibration tokens are embedded, since it needs only the blocks after
    that. A no-op for a model all in memory. :func:`load_rest` reads them again."""
    if not loaded.streamed:
        return
    for path, var in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
        if not is_block_param(loaded.model, ".".join(str(p) for p in path)):
            value = var.get_value()
            var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype))


def load_rest(loaded: LoadedModel) -> None:
    """Read the parameters outside the blocks of a streamed model back if :func:`unload_rest`
    dropped them (a no-op otherwise)."""
    if not loaded.streamed:
        return
    for name in param_shapes(loaded.model):
        if not is_block_param(loaded.model, name) and not is_resident(loaded, name):
            _set_checked(loaded, name, loaded.store(name), loaded.source)


def is_resident(loaded: LoadedModel, name: str) -> bool:
    """Whether parameter ``name`` is in memory (not shapes only)."""
    from ._params import get_param

    return isinstance(get_param(loaded.model, name), jax.Array)


@contextlib.contextmanager
def resident_block(loaded: LoadedModel, b: int) -> Iterator[None]:
    """``with resident_block(loaded, b):`` block ``b`` is in memory inside, dropped after (when streamed)."""
    load_block(loaded, b)
    try:
        yield
    finally:
        unload_block(loaded, b)


def _set_checked(loaded: LoadedModel, name: str, hf_value, file) -> None:
    """Put one Hugging Face-layout tensor into the model: finite, transposed where HF stores
    ``(d_in, d_out)``, rounded to ``loaded.dtype``'s output dtype when one was asked for."""
    value = _float32(hf_value)
    _check_finite(value, name, file or loaded.source)
    if is_transposed_in_hf(loaded.family, name):
        value = value.T
    if loaded.dtype is not None:
        value = round_to(value, loaded.output_dtype(name))
    set_param(loaded.model, name, value)


def _check_finite(value, name: str, file) -> None:
    bad = _count_nonfinite(value)
    if bad:
        raise CheckpointError(file, f"tensor {name!r} {tuple(value.shape)} holds {bad} non-finite values (NaN or inf)")


def round_to(value, dtype) -> Any:
    """float32 ``value`` rounded to ``dtype`` (nearest even) and back: what writing it in
    ``dtype`` and reading it again gives. The identity for float32."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return value
    if isinstance(value, jax.Array):
        return value.astype(jnp.dtype(dtype)).astype(jnp.float32)
    return np.asarray(value, np.float32).astype(dtype).astype(np.float32)


def _float32(array):
    if isinstance(array, jax.Array):  # already on the device: no host round trip
        return array.astype(jnp.float32)
    # Always an owned copy: handing JAX a view of a memory-mapped file made it
    # allocate far more than the tensor (seen: +1 GB for a 256-float norm).
    return np.array(array, dtype=np.float32, copy=True)


def _count_nonfinite(value) -> int:
    if isinstance(value, jax.Array):
        return int(jnp.sum(~jnp.isfinite(value)))
    flat = np.asarray(value).reshape(-1)
    step = 1 << 22  # in chunks: no float32 or boolean copy of a whole large tensor
    return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + step].astype(np.float32))))
               for i in range(0, flat.size, step))


def family_of(config, path: str | os.PathLike = "") -> str:
    """The name of the :data:`FAMILIES` record whose ``model_types`` hold ``config.model_type``:
    ``"llama"`` (``llama``, ``mistral``, ``qwen2``, ``qwen3``), ``"gpt2"``, ``"gemma3"``
    (``gemma3_text``), ``"gemma2"``, ``"phi3"``, ...

    Raises :class:`UnsupportedModelError` naming ``path`` for a model type no family runs; the
    message lists those that are.
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    raise UnsupportedModelError(
        path,
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(HF_ARCHITECTURES)}",
    )


def build_abstract_model(config, path: str | os.PathLike = "") -> tuple[nnx.Module, str]:
    """The model for ``config`` with shape-only parameters (no memory), and its family."""
    family = FAMILIES[family_of(config, path)]
    try:
        spec = family.spec.from_hf(config)
        return nnx.eval_shape(lambda: family.model(spec)), family.name
    except NotImplementedError as e:
        raise UnsupportedModelError(path, str(e)) from e


def hf_to_model_name(family: str, hf_name: str) -> str:
    """Our parameter name for a Hugging Face tensor name (see :meth:`Family.param_name`)."""
    return FAMILIES[family].param_name(hf_name)


def is_transposed_in_hf(family: str, name: str) -> bool:
    """True for weights that Hugging Face stores as ``(d_in, d_out)`` (GPT-2 Conv1D)."""
    return FAMILIES[family].is_transposed(name)


HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A checkpoint tensor the model does not compute with, written back unchanged (a buffer
    such as ``rotary_emb.inv_freq``): its Hugging Face name, shape, stored dtype, the file it
    is in, and ``read()`` giving its stored values."""

    name: str
    shape: tuple
    dtype: np.dtype
    file: str
    read: Callable[[], Any]


def fill_model(model: nnx.Module, family: str, tensors, source, *, dtype: Optional[str] = None,
               stream: Optional[Callable[[str], Any]] = None, config: Any = None) -> LoadedModel:
    """Check ``(hf_name, array, file, stored_dtype)`` tuples and copy them into an abstract model.

    Every loader goes through here, and every stored tensor ends in one of three places:

    - a parameter of the model: read, checked (shape, finite values) and used;
    - a buffer of the family (:attr:`Family.buffers`, values ``transformers`` derives from the
      config and ignores in a checkpoint too): not read, kept in :attr:`LoadedModel.extras` and
      written back unchanged by the writers;
    - anything else: refused, naming every such tensor and its file, before any is read (the
      model would compute without them, which is not what they describe).

    A head stored under a config that ties it (``tie_word_embeddings``): when it holds the
    embedding's values it is the tied copy; when it differs, it is kept and used as
    ``transformers`` does (the model is built with its own head, ``config`` says
    ``tie_word_embeddings=False`` from then on, so the written output keeps it), with a
    :class:`CheckpointNote` saying so.

    Arrays are converted to float32 one at a time (rounded to ``dtype``'s output dtype when one
    is given, see :class:`LoadedModel`). With ``stream`` (a function reading a tensor by our
    name), only tensors outside the decoder blocks are copied; the blocks' are checked and read
    later, a block at a time (:func:`load_block`). ``array`` may be a lazy reader with a
    ``shape`` (:class:`LazyTensor`). Raises :class:`CheckpointError` for a shape mismatch, a
    tensor stored twice, an unknown tensor, a tensor with NaN or inf values, or a parameter that
    no tensor provided. Returns the :class:`LoadedModel`, with ``config`` and no tokenizer.
    """
    if dtype is not None:
        output_dtype("float32", dtype)  # validates the name
    record = FAMILIES[family]
    params, buffers = _sort_tensors(record, tensors)
    shapes = param_shapes(model)
    tied = getattr(model, "lm_head", "absent") is None
    unknown = [hf_name for name, (hf_name, _, _, _) in params.items()
               if name not in shapes and not (tied and name == HEAD)]
    if unknown:
        raise CheckpointError(params[record.param_name(unknown[0])][2], _unknown_problem(record, unknown))
    if tied and HEAD in params:
        if record.embedding not in params:
            raise CheckpointError(source, f"missing tensors: {record.embedding}")
        if _same_values(params[HEAD], params[record.embedding]):
            del params[HEAD]  # the tied head's copy: the embedding itself
        else:
            model = _untied(record, model, config, params[HEAD][2])
            shapes = param_shapes(model)
    missing = [n for n in shapes if n not in params]
    if missing:
        raise CheckpointError(source, f"missing tensors: {_some(missing)}")
    for name, (hf_name, array, file, _) in params.items():
        _check_shape(family, shapes[name], name, hf_name, array, file)
    loaded = LoadedModel(model=model, config=config, tokenizer=None, family=family, source=os.fspath(source),
                         dtype=dtype, store=stream)
    loaded.extras = buffers
    with _progress.current().steps(len(params), f"loading {os.path.basename(os.fspath(source))}",
                                   unit="tensor") as steps:
        for name, (hf_name, array, file, stored) in params.items():
            loaded.dtypes[name] = stored
            value = array() if callable(array) else array
            if stream is None or not is_block_param(model, name):
                _set_checked(loaded, name, value, file)
            else:  # read now only to check it: a bad tensor is refused before anything is written
                _check_finite(value, name, file)
            del value
            steps.advance()
    return loaded


def _sort_tensors(record: Family, tensors) -> tuple[dict, dict]:
    """``({our name: (hf_name, array, file, stored)}, {hf_name: StoredTensor})``: the tensors
    the model may compute with, and the family's buffers. Only names and shapes are looked at."""
    params, buffers, where = {}, {}, {}
    for hf_name, array, file, stored in tensors:
        file = os.fspath(file)
        if hf_name in where:
            raise CheckpointError(file, f"tensor {hf_name!r} is stored twice (also in {where[hf_name]})")
        where[hf_name] = file
        if record.is_buffer(hf_name):
            buffers[hf_name] = StoredTensor(hf_name, tuple(array.shape), _stored_numpy_dtype(stored, array), file,
                                            array if callable(array) else (lambda array=array: array))
            continue
        name = record.param_name(hf_name)
        if name in params:  # "h.0.x" and "transformer.h.0.x": the same parameter twice
            raise CheckpointError(file, f"tensor {hf_name!r} is stored twice (also as {params[name][0]!r} "
                                        f"in {params[name][2]})")
        params[name] = (hf_name, array, file, stored)
    return params, buffers


def _stored_numpy_dtype(stored: str, array) -> np.dtype:
    try:
        return np.dtype(stored)
    except TypeError:
        return np.asarray(array() if callable(array) else array).dtype


def _untied(record: Family, model: nnx.Module, config, file: str) -> nnx.Module:
    """The model of ``model``'s spec with a head of its own, for a checkpoint whose config ties
    the head but which stores a different one; ``config`` is changed to say so."""
    if config is not None:
        config.tie_word_embeddings = False
    warnings.warn(
        f"{file}: the config says tie_word_embeddings=true, but the checkpoint stores its own {HEAD}, "
        f"different from {record.embedding}; fw_jax keeps it and computes with it (as transformers "
        "does), and writes it with tie_word_embeddings=false", CheckpointNote, stacklevel=3)
    spec = dataclasses.replace(model.spec, tie_word_embeddings=False)
    return nnx.eval_shape(lambda: record.model(spec))


def _same_values(a, b) -> bool:
    """Whether two stored tensors (``(hf_name, array, file, stored)``) hold the same values."""
    if tuple(a[1].shape) != tuple(b[1].shape):
        return False
    x, y = (np.asarray(t[1]() if callable(t[1]) else t[1]).reshape(-1) for t in (a, b))
    step = 1 << 22  # in chunks: no float32 copy of a whole large tensor
    return all(np.array_equal(x[i:i + step].astype(np.float32), y[i:i + step].astype(np.float32))
               for i in range(0, x.size, step))


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _unknown_problem(record: Family, unknown: list[str]) -> str:
    from ._moe import fused_experts_problem

    fused = fused_experts_problem(unknown)  # a mixture of experts saved in transformers' in-memory layout
    if fused:
        return fused
    quoted = [repr(n) for n in unknown]
    if len(unknown) == 1:
        what, it, parameter = f"unexpected tensor {quoted[0]}", "it", "no such parameter"
    else:
        what, it, parameter = f"unexpected tensors {_some(quoted)}", "them", "no such parameters"
    return (f"{what}: a {record.name} model with this config has {parameter}, so fw_jax would compute without "
            f"{it}, which is not the model the checkpoint describes. Check the config (e.g. attention_bias, "
            f"mlp_bias) or remove {it} from the checkpoint")


def _check_shape(family: str, expected: tuple, name: str, hf_name: str, array, file) -> None:
    shape = tuple(array.shape)
    if is_transposed_in_hf(family, name):
        shape = shape[::-1]
    if shape != expected:
        raise CheckpointError(file, f"shape mismatch for {hf_name!r}: {tuple(array.shape)}, expected {expected}")
