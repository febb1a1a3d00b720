"""Block-by-block calibration: the converter API the pruning pipeline calls.

Sequential pruning (docs/design.md §15) goes through a model one decoder block at a time::

    h = embed(model, tokens)                      # (N, T, d) block-0 inputs
    for b in range(num_blocks(model)):
        layers = block_linears(model, b)          # [LinearLayer(name, weight, input_key)]
        grams = block_grams(model, b, h)          # {input_key: G = Σ x xᵀ}, (d_in, d_in)
        pruned = {l.name: prune(l.weight, grams[l.input_key]) for l in layers}
        set_linear_weights(model, pruned)         # write back by name, (d_out, d_in)
        h = run_block(model, b, h)                # the PRUNED block feeds block b + 1
    logits = head(model, h)

Linear layers are named by their Hugging Face module name (``model.layers.3.mlp.up_proj``);
layers that read the same activations share one ``input_key`` and one Gram matrix: q/k/v
(``<block>.attn_in``), gate/up (``<block>.mlp_in``); ``o_proj`` (``<block>.attn_out``) and
``down_proj`` (``<block>.mlp_mid``) have their own. GPT-2 has one linear per key. Each expert of a
mixture-of-experts block has its own two keys, its inputs masked to the tokens routed to it
(``<block>.block_sparse_moe.experts.5.in`` and ``.mid``; see ``_moe.py``).

Gram matrices are accumulated over mini-batches (``batch_size`` sequences at a time) by one
jitted step shared by all blocks of a model, in float32 by default or float64 (needs
``jax_enable_x64``), so only one mini-batch of activations exists at any time.
"""

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ._params import resolve


class LinearLayer(NamedTuple):
    """One prunable linear layer of a block.

    Attributes:
      name: Hugging Face module name, e.g. ``"model.layers.3.mlp.up_proj"``.
      weight: ``(d_out, d_in)`` float32 weight.
      input_key: key of this layer's input in :func:`block_grams` (shared by q/k/v, gate/up).
    """

    name: str
    weight: jax.Array
    input_key: str


def num_blocks(model: nnx.Module) -> int:
    """Number of decoder blocks."""
    return len(model.blocks)


def block_linears(model: nnx.Module, b: int) -> list[LinearLayer]:
    """The linear layers of block ``b`` in forward order, with their input keys."""
    block = model.blocks[b]
    prefix = f"{model.block_path}.{b}"
    layers = []
    for key, members in block.LINEAR_GROUPS:
        for member in members:
            weight = resolve(block, member).weight.get_value()
            layers.append(LinearLayer(f"{prefix}.{member}", weight, f"{prefix}.{key}"))
    return layers


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _head(graphdef, state, h):
    return nnx.merge(graphdef, state).head(h)


@functools.partial(jax.jit, static_argnums=0)
def _block_step(graphdef, state, h, context):
    return nnx.merge(graphdef, state).forward(h, context)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _gram_step(graphdef, state, h, context, grams):
    _, inputs = nnx.merge(graphdef, state).forward(h, context)
    new = {}
    for key, gram in grams.items():
        x = inputs[key].reshape(-1, inputs[key].shape[-1]).astype(gram.dtype)
        new[key] = gram + jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
    return new


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _gram_and_inputs_step(graphdef, state, h, context, grams):
    _, inputs = nnx.merge(graphdef, state).forward(h, context)
    new, flat = {}, {}
    for key, gram in grams.items():
        x = inputs[key].reshape(-1, inputs[key].shape[-1]).astype(gram.dtype)
        new[key] = gram + jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
        flat[key] = x.astype(jnp.float32)
    return new, flat


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4, 5))
def _gram_count_step(graphdef, state, h, context, grams, counts, with_inputs):
    # Also counts each input's rows that are not all zeros: the tokens routed to an expert (_moe.py).
    _, inputs = nnx.merge(graphdef, state).forward(h, context)
    new, new_counts, flat = {}, {}, {}
    for key, gram in grams.items():
        x = inputs[key].reshape(-1, inputs[key].shape[-1]).astype(gram.dtype)
        new[key] = gram + jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
        new_counts[key] = counts[key] + jnp.sum(jnp.any(x != 0, axis=-1), dtype=jnp.int32)
        if with_inputs:
            flat[key] = x.astype(jnp.float32)
    return new, new_counts, flat


@functools.partial(jax.jit, static_argnums=0)
def _block_output_step(graphdef, state, h, context):
    # The next hidden states only: the linear inputs (an expert's, E of them) are not kept.
    return nnx.merge(graphdef, state).forward(h, context)[0]


def _block_context(model, seq_len):
    # Arrays shared by all blocks (RoPE tables); cheap, so recomputed per mini-batch.
    return model.block_context(seq_len)


def _batches(hidden, batch_size: int | None) -> Iterable[jax.Array]:
    if isinstance(hidden, (jax.Array,)) or hasattr(hidden, "shape"):
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be (N, T, d), got shape {hidden.shape}")
        step = batch_size or hidden.shape[0]
        return (hidden[i : i + step] for i in range(0, hidden.shape[0], step))
    return hidden


def _all_in_memory(state) -> bool:
    """False for a streamed model whose blocks are shapes only (``load_model(stream=True)``)."""
    return all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))


def embed(model: nnx.Module, tokens) -> jax.Array:
    """Block-0 inputs (token + position embeddings) for ids (B, T): (B, T, d) float32."""
    graphdef, state = nnx.split(model)
    if not _all_in_memory(state):  # the blocks are not there to be traced: run op by op
        return model.embed(jnp.asarray(tokens))
    return _embed(graphdef, state, jnp.asarray(tokens))


def head(model: nnx.Module, hidden: jax.Array) -> jax.Array:
    """Final norm and LM head on the last block's outputs: (B, T, vocab) float32 logits."""
    graphdef, state = nnx.split(model)
    if not _all_in_memory(state):
        return model.head(hidden)
    return _head(graphdef, state, hidden)


def run_block(model: nnx.Module, b: int, hidden, *, batch_size: int | None = 4) -> jax.Array:
    """Outputs of block ``b`` (with its current, possibly pruned, weights) for (N, T, d) inputs.

    ``batch_size`` sequences go through the block at a time (attention holds a (B, H, T, T)
    score tensor, so keep it small for long sequences); ``None``: all at once.
    """
    graphdef, state = nnx.split(model.blocks[b])
    outs = []
    for h in _batches(hidden, batch_size):
        h = jnp.asarray(h, jnp.float32)
        context = _block_context(model, h.shape[1])
        outs.append(_block_output_step(graphdef, state, h, context))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def block_inputs(model: nnx.Module, b: int, hidden: jax.Array) -> dict[str, jax.Array]:
    """The input of every linear group of block ``b``, ``{input_key: (B, T, d_in)}``.

    Materialises all activations: meant for tests and inspection, not for calibration.
    """
    graphdef, state = nnx.split(model.blocks[b])
    hidden = jnp.asarray(hidden, jnp.float32)
    _, inputs = _block_step(graphdef, state, hidden, _block_context(model, hidden.shape[1]))
    prefix = f"{model.block_path}.{b}"
    return {f"{prefix}.{k}": v for k, v in inputs.items()}


def block_grams(
    model: nnx.Module,
    b: int,
    hidden,
    *,
    batch_size: int | None = 4,
    dtype=jnp.float32,
    return_inputs: bool = False,
    return_counts: bool = False,
):
    """Gram matrix ``G = Σ_tokens x xᵀ`` of each distinct linear input of block ``b``.

    Args:
      model: a model from :func:`fw_jax.models.load_model`.
      b: block index.
      hidden: the block's inputs, an (N, T, d) array (split into ``batch_size`` sequences per
        step) or an iterable of (B, T, d) arrays.
      batch_size: sequences per jitted step when ``hidden`` is an array; ``None``: all at once.
      dtype: accumulation dtype, ``jnp.float32`` (default) or ``jnp.float64``.
      return_inputs: also return the inputs themselves, ``{input_key: (n_tokens, d_in)}``
        float32 (worth it when there are fewer tokens than inputs: they are then smaller than
        the Gram matrices, and errors are cheaper from them).
      return_counts: also return ``{input_key: tokens}`` (ints), how many tokens gave a row that
        is not all zeros: every token for a dense layer; for an expert of a mixture-of-experts
        block, the tokens routed to it (its inputs are zero elsewhere, see ``_moe.py``).

    Returns:
      ``{input_key: (d_in, d_in) array}`` (see :func:`block_linears` for the keys); with
      ``return_inputs`` and/or ``return_counts``, a tuple of it, then the inputs, then the counts.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("float64 Gram matrices need jax.config.update('jax_enable_x64', True)")
    block = model.blocks[b]
    graphdef, state = nnx.split(block)
    d_in = {key: resolve(block, members[0]).d_in for key, members in block.LINEAR_GROUPS}
    grams = {key: jnp.zeros((n, n), dtype) for key, n in d_in.items()}
    parts, counts = [], {key: jnp.zeros((), jnp.int32) for key in d_in}
    for h in _batches(hidden, batch_size):
        h = jnp.asarray(h, jnp.float32)
        context = _block_context(model, h.shape[1])
        if return_counts:
            grams, counts, flat = _gram_count_step(graphdef, state, h, context, grams, counts, return_inputs)
            if return_inputs:
                parts.append(flat)
        elif return_inputs:
            grams, flat = _gram_and_inputs_step(graphdef, state, h, context, grams)
            parts.append(flat)
        else:
            grams = _gram_step(graphdef, state, h, context, grams)
    prefix = f"{model.block_path}.{b}"
    grams = {f"{prefix}.{k}": g for k, g in grams.items()}
    if not (return_inputs or return_counts):
        return grams
    out = (grams,)
    if return_inputs:
        out += ({f"{prefix}.{k}": jnp.concatenate([p[k] for p in parts]) for k in d_in},)
    if return_counts:
        out += ({f"{prefix}.{k}": int(c) for k, c in counts.items()},)
    return out


def logits(model: nnx.Module, tokens, *, batch_size: int | None = 4) -> jax.Array:
    """Logits (B, T, vocab) float32, computed block by block with one compiled block step."""
    h = embed(model, tokens)
    for b in range(num_blocks(model)):
        h = run_block(model, b, h, batch_size=batch_size)
    return head(model, h)
