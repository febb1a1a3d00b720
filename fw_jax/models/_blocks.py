"""What the pruning engine needs from a model: the :class:`Blocks` interface.

The engine (``fw_jax.pipeline.prune``) goes through a model one block at a time and never looks
inside it: it asks a :class:`Blocks` for block 0's calibration inputs, then for each block its
linear layers as ``(d_out, d_in)`` weights, the Gram matrix of each layer's input, writes the
pruned weights back and runs the block to get the next block's inputs. A model front-end is a
class with these methods:

- :class:`LoadedBlocks` wraps a :class:`~fw_jax.models.LoadedModel` (the families fw_jax ports:
  Hugging Face folders, GGUF, msgpack), streamed or not, with per-block checkpoints.
- ``fw_jax.prune`` wraps any Flax model a user already has.

What the engine passes between blocks (``hidden``) is the front-end's own business: an
``(N, T, d)`` array here, captured call arguments for an arbitrary Flax model.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from ._calibration import LinearLayer, block_linears, embed, num_blocks, run_block
from ._loaded import LoadedModel, round_to, unload_rest
from ._experts import fallback
from ._moe import expert_layer
from ._params import set_linear_weights
from ._shards import read_block_shard, write_block_shard

__all__ = ["Blocks", "LoadedBlocks", "as_blocks"]


@runtime_checkable
class Blocks(Protocol):
    """A model as the pruning engine sees it: a sequence of blocks run one after another.

    The engine calls ``first_inputs`` once, then, per block inside ``resident(b)``: ``linears``,
    ``grams``, ``set_weights`` and ``run``.

    Attributes:
      source: what the model is (a path, a class name), for messages and the run record.

    A front-end may also provide (the engine looks for them): ``read_shard(b, path)`` and
    ``write_shard(b, path)`` (per-block checkpoints: needed for ``work_dir``, so for resuming),
    ``dtype`` (the dtype the model is written in, for the run record), ``streamed`` (blocks
    live only in their checkpoints once pruned: ``work_dir`` required), ``max_positions`` (the
    longest sequence), ``token_count(hidden)`` (to compute errors from the inputs when there are
    fewer tokens than inputs), ``layer_notes(b)`` (``{layer name: fields}`` added to the layer
    records, e.g. an expert's routed ``tokens`` and ``fallback``).
    """

    source: str

    def __len__(self) -> int:
        """The number of blocks."""

    def first_inputs(self, samples) -> Any:
        """Block 0's calibration inputs for ``samples`` (token ids, or the user's batches)."""

    def resident(self, b: int, tensors: Optional[dict] = None) -> ContextManager[None]:
        """``with blocks.resident(b):`` block ``b`` is in memory inside (with ``tensors``, a saved
        checkpoint of it, instead of the model's own weights) and released after, also on error."""

    def linears(self, b: int) -> list[LinearLayer]:
        """Block ``b``'s prunable linear layers in forward order, as ``(d_out, d_in)`` weights, each
        with the key of its input (layers reading the same input share one key and one Gram)."""

    def grams(self, b: int, hidden, *, return_inputs: bool = False):
        """``{input_key: Σ x xᵀ}`` over the calibration inputs ``hidden`` of block ``b``, float32;
        with ``return_inputs`` also ``{input_key: (n_tokens, d_in)}`` the inputs themselves."""

    def run(self, b: int, hidden) -> Any:
        """Block ``b``'s outputs (with its current weights): the next block's ``hidden``."""

    def set_weights(self, b: int, weights: dict) -> None:
        """Write ``{layer name: (d_out, d_in)}`` pruned weights into block ``b``."""


class LoadedBlocks:
    """The :class:`Blocks` of a :class:`~fw_jax.models.LoadedModel`.

    ``hidden`` is an ``(N, T, d)`` array kept in ``hidden_dtype`` between blocks (every block
    computes in float32). Pruned weights are rounded to the dtype they are saved in when the model
    was loaded with one, so that the next block is calibrated on the model as it will be written.
    Gram matrices are summed by ``fw_jax.pipeline.distributed.block_grams``, the same in any number
    of processes.
    """

    def __init__(self, loaded: LoadedModel, hidden_dtype: str = "float32"):
        self.loaded = loaded
        self.model = loaded.model
        self.source = str(loaded.source)
        self.dtype = loaded.dtype  #: the dtype the model is written in (``None``: each tensor's own)
        self.hidden_dtype = jnp.dtype(hidden_dtype)
        #: ``{block: {expert name: tokens}}``: every expert's routed tokens, and those pruned on
        #: fallback Gram matrices (too few tokens)
        self.expert_tokens: dict[int, dict[str, int]] = {}
        self.fallbacks: dict[int, dict[str, int]] = {}
        self._fallback_notes: dict[int, dict[str, str]] = {}  # {block: {input key: fallback note}}
        config = loaded.config
        #: the longest sequence the model takes, or ``None``
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def __len__(self) -> int:
        return num_blocks(self.model)

    @property
    def streamed(self) -> bool:
        return self.loaded.streamed

    def first_inputs(self, samples) -> jax.Array:
        hidden = embed(self.model, jnp.asarray(samples)).astype(self.hidden_dtype)
        unload_rest(self.loaded)  # streamed: only the blocks are needed from here on
        return hidden

    @contextlib.contextmanager
    def resident(self, b: int, tensors: Optional[dict] = None) -> Iterator[None]:
        from fw_jax import models  # the public functions, looked up when called (tests watch them)

        models.load_block(self.loaded, b, tensors)
        try:
            yield
        finally:
            models.unload_block(self.loaded, b)

    def linears(self, b: int) -> list[LinearLayer]:
        return block_linears(self.model, b)

    def grams(self, b: int, hidden, *, return_inputs: bool = False):
        """As :meth:`Blocks.grams`. In a mixture-of-experts block, an expert that too few tokens
        were routed to gets the fallback matrices of ``fw_jax.models.with_expert_fallback``, and
        :attr:`fallbacks` records it: ``{b: {expert name: tokens}}``."""
        from fw_jax.pipeline import distributed  # the pipeline's process group (imports models)

        layer = expert_layer(self.model, b)
        if layer is None:
            return distributed.block_grams(self.model, b, hidden, return_inputs=return_inputs)
        out = distributed.block_grams(self.model, b, hidden, return_inputs=return_inputs, return_counts=True)
        grams, counts = out[0], out[-1]
        self.expert_tokens[b] = layer.tokens(counts)
        self.fallbacks[b] = layer.falling_back(counts)
        grams, self._fallback_notes[b] = fallback(layer, grams, counts)
        return (grams, out[1]) if return_inputs else grams

    def layer_notes(self, b: int) -> dict[str, dict]:
        """``{layer name: fields}`` the engine adds to block ``b``'s layer records: for an expert's
        layers, the calibration ``tokens`` routed to it and, if it had too few, its ``fallback``."""
        notes = {}
        fell_back = self._fallback_notes.get(b, {})
        for layer in self.linears(b):
            for expert, tokens in self.expert_tokens.get(b, {}).items():
                if layer.name.startswith(expert + "."):
                    notes[layer.name] = {"tokens": tokens}
                    if layer.input_key in fell_back:
                        notes[layer.name]["fallback"] = fell_back[layer.input_key]
        return notes

    def token_count(self, hidden) -> int:
        """Calibration tokens in ``hidden`` (this process's)."""
        return int(np.prod(hidden.shape[:2]))

    def run(self, b: int, hidden) -> jax.Array:
        return run_block(self.model, b, hidden).astype(self.hidden_dtype)

    def read_shard(self, b: int, path) -> dict:
        """Block ``b``'s checkpoint written by :meth:`write_shard`, checked
        (:class:`~fw_jax.models.CheckpointError` names the file when it cannot be used)."""
        return read_block_shard(self.loaded, path, b)

    def write_shard(self, b: int, path) -> None:
        """Block ``b``'s shard of the output (every tensor of the block, in its output dtype)."""
        write_block_shard(self.loaded, b, path)

    def set_weights(self, b: int, weights: dict) -> None:
        if self.loaded.dtype is not None:
            weights = {name: round_to(w, self.loaded.output_dtype(name + ".weight")) for name, w in weights.items()}
        set_linear_weights(self.model, weights)


def as_blocks(model, hidden_dtype: str = "float32") -> Blocks:
    """``model`` as :class:`Blocks`: a :class:`~fw_jax.models.LoadedModel` is wrapped in
    :class:`LoadedBlocks`; anything that has the methods already is returned as is."""
    if isinstance(model, LoadedModel):
        return LoadedBlocks(model, hidden_dtype)
    if isinstance(model, Blocks):
        return model
    raise TypeError(f"expected a fw_jax.models.LoadedModel or a fw_jax.models.Blocks, got {type(model).__name__}")
