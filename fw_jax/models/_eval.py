"""Perplexity of a model on a token stream (the protocol of docs/design.md §16)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fw_jax import _progress

from ._calibration import embed, head, logits, num_blocks, run_block
from ._loaded import LoadedModel, load_block, load_rest, unload_block


@jax.jit
def _window_nll(logits_, targets):
    logp = jax.nn.log_softmax(logits_.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked, dtype=jnp.float32), picked.size


def perplexity(
    model: nnx.Module | LoadedModel,
    token_ids,
    seqlen: int,
    *,
    bos_per_window: bool = False,
    bos_id: int | None = None,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> float:
    """``exp(mean NLL)`` over non-overlapping windows of ``seqlen`` tokens (tail dropped).

    Each window predicts its tokens 2..seqlen from the previous ones. With ``bos_per_window``
    every window starts with ``bos_id`` followed by ``seqlen - 1`` text tokens (Gemma needs it).
    Progress over the windows goes to :func:`fw_jax._progress.current`, titled ``desc``.

    ``model`` may be a :class:`LoadedModel`; a streamed one (``load_model(..., stream=True)``)
    is run block by block, every window through block ``b`` before block ``b + 1`` is read, so a
    model larger than memory can be measured (the hidden states of all windows are held).
    """
    ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    body = seqlen - 1 if bos_per_window else seqlen
    if bos_per_window and bos_id is None:
        raise ValueError("bos_per_window=True needs bos_id")
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"{len(ids)} tokens is less than one window of {body}")
    windows = ids[: n * body].reshape(n, body)
    if bos_per_window:
        windows = np.concatenate([np.full((n, 1), bos_id, np.int32), windows], axis=1)
    if isinstance(model, LoadedModel):
        if model.streamed:
            return _streamed_perplexity(model, windows, batch_size, desc)
        model = model.model
    total, count = 0.0, 0
    with _progress.current().steps(n, desc, unit="window") as steps:
        for i in range(0, n, batch_size):
            batch = jnp.asarray(windows[i : i + batch_size])
            out = logits(model, batch)
            nll, c = _window_nll(out[:, :-1], batch[:, 1:])
            total += float(nll)
            count += int(c)
            steps.advance(len(batch), note=f"ppl {math.exp(total / count):.2f}")
    return math.exp(total / count)


def _streamed_perplexity(loaded: LoadedModel, windows: np.ndarray, batch_size: int, desc: str) -> float:
    """:func:`perplexity` of a streamed model: all windows through one block at a time."""
    model = loaded.model
    load_rest(loaded)  # pruning drops the embeddings and head of a streamed model
    batches = [jnp.asarray(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    hidden = [embed(model, batch) for batch in batches]
    progress = _progress.current()
    with progress.steps(num_blocks(model), f"{desc}, {len(windows)} windows through", unit="block") as steps:
        for b in range(num_blocks(model)):
            load_block(loaded, b)
            hidden = [run_block(model, b, h) for h in hidden]
            unload_block(loaded, b)
            steps.advance()
    total, count = 0.0, 0
    with progress.steps(len(windows), desc, unit="window") as steps:
        for batch, h in zip(batches, hidden):
            nll, c = _window_nll(head(model, h)[:, :-1], batch[:, 1:])
            total += float(nll)
            count += int(c)
            steps.advance(len(batch), note=f"ppl {math.exp(total / count):.2f}")
    return math.exp(total / count)
