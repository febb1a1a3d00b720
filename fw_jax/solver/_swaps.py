"""1-swap refinement of a binary mask (docs/design.md §10); the budgets (``_budgets.py``) call it,
and ``swap_refine`` there chooses the refinement of a budget.

In a row with residual ``r = w ⊙ (1 − m)`` and ``c = G r``, bringing back a pruned weight ``i``
and pruning a kept weight ``j`` changes the error by exactly

    Δ_ij = a_i + b_j − 2 w_i w_j G_ij,   a_i = −2 w_i c_i + w_i² G_ii,   b_j = 2 w_j c_j + w_j² G_jj.

A step applies, in every unit at once, the most negative ``Δ`` it examines and updates
``c ← c + w_j G[:, j] − w_i G[:, i]``. Every accepted swap strictly lowers the true error and
keeps the budget, so refinement is monotone; it stops in a unit when no examined swap helps.

Which pairs are examined:
  * ``PerRow`` and ``LayerBudget``: the pair of the best incoming weight (smallest ``a``) with
    its exact best partner among all kept weights, and the pair of the best outgoing weight
    (smallest ``b``) with its exact best partner among all pruned weights: ``2·d`` pairs per
    step for a cost of a few passes over the row. A layer budget first refines every row with
    its counts held, then moves weights between rows (cross-row pairs have no ``G_ij`` term).
  * ``NM``: every (pruned, kept) pair inside every block, exhaustively.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

__all__ = ["SwapResult", "refine_blocks", "refine_rows", "refine_whole"]

#: Rows swapped together (``refine_rows``, ``refine_blocks``): a group runs until its own slowest
#: row stops. Smaller groups skip more finished rows but pay each step's fixed overhead more often.
ROWS_PER_GROUP = 64


class SwapResult(NamedTuple):
    mask: Array  #: (d_out, d_in) boolean.
    swaps: Array  #: number of accepted swaps (per unit).
    product: Array  #: (d_out, d_in) ``(W ⊙ (1 − mask)) G`` of the returned mask (row errors and bounds reuse it).


def _first_argmin(x):
    """``jnp.argmin(x)`` of a flat or reshaped array (first index of the minimum), as two vectorised
    reductions: XLA's CPU argmin is a scalar loop, about 3× slower on the swaps' row sizes. Float
    indices are exact below 2²⁴ entries; larger arrays use ``jnp.argmin``."""
    flat = x.reshape(-1)
    if flat.size >= 2**24:
        return jnp.argmin(flat)
    least = jnp.min(flat)
    index = jnp.arange(flat.size, dtype=jnp.float32)
    first = jnp.min(jnp.where(flat == least, index, jnp.inf))
    # All-NaN (never here: the inputs are checked finite) would leave inf; argmin's answer is 0.
    return jnp.where(jnp.isfinite(first), first, 0).astype(jnp.int32)


def _best_swap_capped(weight, mask, frozen, corr, gram, diag):
    """Best examined swap in one unit of shape ``(r, d_in)``: (delta, flat i, flat j)."""
    rows, d_in = weight.shape
    row_of = jnp.arange(rows)[:, None]
    own = weight * (2 * corr)
    self_term = weight**2 * diag[None, :]
    bring_back = jnp.where(mask, jnp.inf, -own + self_term)
    prune = jnp.where(mask & ~frozen, own + self_term, jnp.inf)
    flat_w = weight.reshape(-1)

    def partner_delta(anchor, anchor_cost, other_cost):
        row, col = anchor // d_in, anchor % d_in
        cross = 2 * flat_w[anchor] * weight * gram[col][None, :] * (row_of == row)
        return anchor_cost.reshape(-1)[anchor] + other_cost - cross

    i_first = _first_argmin(bring_back)
    delta_in = partner_delta(i_first, bring_back, prune)
    j_for_i = _first_argmin(delta_in)
    j_first = _first_argmin(prune)
    delta_out = partner_delta(j_first, prune, bring_back)
    i_for_j = _first_argmin(delta_out)
    best_in = delta_in.reshape(-1)[j_for_i]
    best_out = delta_out.reshape(-1)[i_for_j]
    use_in = best_in <= best_out
    return (
        jnp.where(use_in, best_in, best_out),
        jnp.where(use_in, i_first, i_for_j),
        jnp.where(use_in, j_for_i, j_first),
    )


def _best_swap_nm(weight, mask, frozen, corr, gram_blocks, diag, m):
    """Best swap within any block of one row ``(d_in,)``: (delta, i, j)."""
    blocks = weight.shape[-1] // m
    w = weight.reshape(blocks, m)
    kept = mask.reshape(blocks, m)
    own = w * (2 * corr.reshape(blocks, m))
    self_term = w**2 * diag.reshape(blocks, m)
    bring_back = jnp.where(kept, jnp.inf, -own + self_term)
    prune = jnp.where(kept & ~frozen.reshape(blocks, m), own + self_term, jnp.inf)
    delta = (
        bring_back[:, :, None]
        + prune[:, None, :]
        - 2 * w[:, :, None] * w[:, None, :] * gram_blocks
    )
    flat = _first_argmin(delta)
    block, rest = flat // (m * m), flat % (m * m)
    return delta.reshape(-1)[flat], block * m + rest // m, block * m + rest % m


def _refine_units(weight, mask, frozen, gram, best_swap, max_swaps, refresh_every, product):
    """Greedy swaps on units ``(units, r, d_in)`` until no unit improves or ``max_swaps``, from
    ``product = (W ⊙ (1 − mask)) G``. Returns the refined mask and the swaps per unit; the
    caller applies :func:`_guard`."""
    units, rows, d_in = weight.shape
    dtype = weight.dtype
    tiny = jnp.finfo(dtype).eps * 64

    def correlation(mask):
        return (weight * ~mask) @ gram

    def errors(mask, corr):
        return jnp.sum(weight * ~mask * corr, axis=(1, 2))

    def cond(state):
        step, _, _, _, active, _ = state
        return (step < max_swaps) & jnp.any(active)

    def body(state):
        step, mask, corr, error, active, swaps = state
        corr = lax.cond(
            (step > 0) & (step % refresh_every == 0), lambda: correlation(mask), lambda: corr
        )
        delta, i, j = jax.vmap(best_swap)(weight, mask, frozen, corr)
        accept = active & (delta < -tiny * jnp.abs(error)) & jnp.isfinite(delta)
        ri, ci = i // d_in, i % d_in
        rj, cj = j // d_in, j % d_in
        unit = jnp.arange(units)
        flat_mask = mask.reshape(units, -1)
        flat_mask = flat_mask.at[unit, i].set(jnp.where(accept, True, flat_mask[unit, i]))
        flat_mask = flat_mask.at[unit, j].set(jnp.where(accept, False, flat_mask[unit, j]))
        wi = weight.reshape(units, -1)[unit, i] * accept
        wj = weight.reshape(units, -1)[unit, j] * accept
        if rows == 1:  # one row per unit: whole-array updates (XLA's CPU scatter is slow)
            corr = corr - (wi[:, None] * gram[ci])[:, None, :]
            corr = corr + (wj[:, None] * gram[cj])[:, None, :]
        else:
            corr = corr.at[unit, ri].add(-wi[:, None] * gram[ci])
            corr = corr.at[unit, rj].add(wj[:, None] * gram[cj])
        error = error + jnp.where(accept, delta, 0)
        return step + 1, flat_mask.reshape(mask.shape), corr, error, accept, swaps + accept

    init = (
        jnp.array(0, jnp.int32),
        mask,
        product,
        errors(mask, product),
        jnp.ones((units,), bool),
        jnp.zeros((units,), jnp.int32),
    )
    _, refined, _, _, _, swaps = lax.while_loop(cond, body, init)
    return refined, swaps


def _guard(weight, gram, mask, product, refined, swaps):
    """Against float drift, a unit ``(units, r, d_in)`` never leaves worse than it came in (the
    loop's running error only scales its acceptance threshold): the refined mask where its fresh
    error is no higher, else the mask given. Returns the mask, the swaps kept and its product."""
    final = (weight * ~refined) @ gram
    before = jnp.sum(weight * ~mask * product, axis=(1, 2))
    keep = (jnp.sum(weight * ~refined * final, axis=(1, 2)) <= before)[:, None, None]
    return jnp.where(keep, refined, mask), jnp.where(keep[:, 0, 0], swaps, 0), jnp.where(keep, final, product)


def refine_rows(weight, gram, mask, frozen, max_swaps, refresh_every, product=None) -> SwapResult:
    """1-swaps inside every row (a per-row budget). ``product``: ``(W ⊙ (1 − mask)) G`` if known
    (saves a matrix product)."""
    diag = jnp.diagonal(gram)

    def best(w, msk, frz, corr):
        return _best_swap_capped(w, msk, frz, corr, gram, diag)

    return _per_row(weight, gram, mask, frozen, best, max_swaps, refresh_every, product)


def _per_row(weight, gram, mask, frozen, best, max_swaps, refresh_every, product):
    """Swaps with one row per unit, in groups of :data:`ROWS_PER_GROUP` rows, one group after
    another: a group's loop stops when its own last row does, so rows that stopped early do not
    pass through the steps of the slowest row of the layer (per-row results are the same)."""
    d_out, d_in = weight.shape
    if product is None:
        product = (weight * ~mask) @ gram
    groups = -(-d_out // ROWS_PER_GROUP)
    size = -(-d_out // groups)  # as even as possible: padding rows (no swap possible) cost steps too
    pad = groups * size - d_out

    def split(x):  # padding rows: zero weights, nothing kept, so no swap can help them
        return jnp.pad(x, ((0, pad), (0, 0))).reshape(groups, size, 1, d_in)

    def one(group):
        return _refine_units(*group[:3], gram, best, max_swaps, refresh_every, group[3])

    refined, swaps = lax.map(one, (split(weight), split(mask), split(frozen), split(product)))
    # the guard on the whole layer: its fresh product is one GEMM, not one per group
    refined, swaps, final = _guard(weight[:, None], gram, mask[:, None], product[:, None],
                                   refined.reshape(-1, 1, d_in)[:d_out], swaps.reshape(-1)[:d_out])
    return SwapResult(refined[:, 0], swaps, final[:, 0])


def refine_blocks(weight, gram, mask, frozen, m, max_swaps, refresh_every, product=None) -> SwapResult:
    """1-swaps inside every block of ``m`` consecutive inputs of every row (an n:m budget)."""
    diag = jnp.diagonal(gram)
    idx = jnp.arange(weight.shape[1]).reshape(-1, m)
    gram_blocks = gram[idx[:, :, None], idx[:, None, :]]

    def best(w, msk, frz, corr):
        return _best_swap_nm(w[0], msk[0], frz[0], corr[0], gram_blocks, diag, m)

    return _per_row(weight, gram, mask, frozen, best, max_swaps, refresh_every, product)


def refine_whole(weight, gram, mask, frozen, max_swaps, refresh_every, product=None) -> SwapResult:
    """1-swaps over the whole layer (a layer budget): every row first with its count held,
    then moves of weights between rows."""
    diag = jnp.diagonal(gram)

    def best(w, msk, frz, corr):
        return _best_swap_capped(w, msk, frz, corr, gram, diag)

    rows = refine_rows(weight, gram, mask, frozen, max_swaps, refresh_every, product)
    moved, cross_swaps = _refine_units(
        weight[None], rows.mask[None], frozen[None], gram, best, max_swaps, refresh_every, rows.product[None]
    )
    moved, cross_swaps, final = _guard(weight[None], gram, rows.mask[None], rows.product[None], moved, cross_swaps)
    return SwapResult(moved[0], jnp.sum(rows.swaps, keepdims=True) + cross_swaps, final[0])
