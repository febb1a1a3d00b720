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


class SwapResult(NamedTuple):
    mask: Array  #: (d_out, d_in) boolean.
    swaps: Array  #: number of accepted swaps (per unit).


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

    i_first = jnp.argmin(bring_back)
    delta_in = partner_delta(i_first, bring_back, prune)
    j_for_i = jnp.argmin(delta_in)
    j_first = jnp.argmin(prune)
    delta_out = partner_delta(j_first, prune, bring_back)
    i_for_j = jnp.argmin(delta_out)
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
    flat = jnp.argmin(delta.reshape(-1))
    block, rest = flat // (m * m), flat % (m * m)
    return delta.reshape(-1)[flat], block * m + rest // m, block * m + rest % m


def _refine_units(weight, mask, frozen, gram, best_swap, max_swaps, refresh_every):
    """Greedy swaps on units ``(units, r, d_in)`` until no unit improves or ``max_swaps``."""
    units, rows, d_in = weight.shape
    dtype = weight.dtype
    tiny = jnp.finfo(dtype).eps * 64

    def correlation(mask):
        return (weight * ~mask) @ gram

    def errors(mask, corr):
        return jnp.sum(weight * ~mask * corr, axis=(1, 2))

    def cond(state):
        step, _, _, active, _ = state
        return (step < max_swaps) & jnp.any(active)

    def body(state):
        step, mask, corr, active, swaps = state
        corr = lax.cond(
            (step > 0) & (step % refresh_every == 0), lambda: correlation(mask), lambda: corr
        )
        delta, i, j = jax.vmap(best_swap)(weight, mask, frozen, corr)
        scale = jnp.abs(errors(mask, corr))
        accept = active & (delta < -tiny * scale) & jnp.isfinite(delta)
        ri, ci = i // d_in, i % d_in
        rj, cj = j // d_in, j % d_in
        unit = jnp.arange(units)
        flat_mask = mask.reshape(units, -1)
        flat_mask = flat_mask.at[unit, i].set(jnp.where(accept, True, flat_mask[unit, i]))
        flat_mask = flat_mask.at[unit, j].set(jnp.where(accept, False, flat_mask[unit, j]))
        wi = weight.reshape(units, -1)[unit, i] * accept
        wj = weight.reshape(units, -1)[unit, j] * accept
        corr = corr.at[unit, ri].add(-wi[:, None] * gram[ci])
        corr = corr.at[unit, rj].add(wj[:, None] * gram[cj])
        return step + 1, flat_mask.reshape(mask.shape), corr, accept, swaps + accept

    init = (
        jnp.array(0, jnp.int32),
        mask,
        correlation(mask),
        jnp.ones((units,), bool),
        jnp.zeros((units,), jnp.int32),
    )
    _, refined, _, _, swaps = lax.while_loop(cond, body, init)
    # Guard against float drift: a unit never leaves worse than it came in.
    before = errors(mask, correlation(mask))
    after = errors(refined, correlation(refined))
    keep = (after <= before)[:, None, None]
    return jnp.where(keep, refined, mask), jnp.where(keep[:, 0, 0], swaps, 0)


def refine_rows(weight, gram, mask, frozen, max_swaps, refresh_every) -> SwapResult:
    """1-swaps inside every row (a per-row budget)."""
    diag = jnp.diagonal(gram)

    def best(w, msk, frz, corr):
        return _best_swap_capped(w, msk, frz, corr, gram, diag)

    refined, swaps = _refine_units(
        weight[:, None, :], mask[:, None, :], frozen[:, None, :], gram, best, max_swaps, refresh_every
    )
    return SwapResult(refined[:, 0, :], swaps)


def refine_blocks(weight, gram, mask, frozen, m, max_swaps, refresh_every) -> SwapResult:
    """1-swaps inside every block of ``m`` consecutive inputs of every row (an n:m budget)."""
    diag = jnp.diagonal(gram)
    idx = jnp.arange(weight.shape[1]).reshape(-1, m)
    gram_blocks = gram[idx[:, :, None], idx[:, None, :]]

    def best(w, msk, frz, corr):
        return _best_swap_nm(w[0], msk[0], frz[0], corr[0], gram_blocks, diag, m)

    refined, swaps = _refine_units(
        weight[:, None, :], mask[:, None, :], frozen[:, None, :], gram, best, max_swaps, refresh_every
    )
    return SwapResult(refined[:, 0, :], swaps)


def refine_whole(weight, gram, mask, frozen, max_swaps, refresh_every) -> SwapResult:
    """1-swaps over the whole layer (a layer budget): every row first with its count held,
    then moves of weights between rows."""
    diag = jnp.diagonal(gram)

    def best(w, msk, frz, corr):
        return _best_swap_capped(w, msk, frz, corr, gram, diag)

    rows = refine_rows(weight, gram, mask, frozen, max_swaps, refresh_every)
    moved, cross_swaps = _refine_units(
        weight[None], rows.mask[None], frozen[None], gram, best, max_swaps, refresh_every
    )
    return SwapResult(moved[0], jnp.sum(rows.swaps, keepdims=True) + cross_swaps)
