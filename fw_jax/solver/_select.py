"""Exact, deterministic "pick the best ``count`` entries" primitives shared by LMOs, rounding and
saliency masks.

Tie-breaking everywhere: among equal keys the entry with the lower flat index wins. Dequantized
weights have many exact ties, so this rule is what makes masks reproducible.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import Array, lax


def _int_type(dtype) -> tuple:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return jnp.int64, 64
    if dtype == jnp.float32:
        return jnp.int32, 32
    raise ValueError(f"selection keys must be float32 or float64, got {dtype}")


def sortable_keys(values: Array) -> Array:
    """Map floats to signed integers with the same order (``a < b ⇔ key(a) < key(b)``)."""
    int_dtype, bits = _int_type(values.dtype)
    raw = lax.bitcast_convert_type(values, int_dtype)
    magnitude_bits = jnp.array((1 << (bits - 1)) - 1, int_dtype)
    # Negative floats have the sign bit set and order reversed in their magnitude bits.
    return jnp.where(raw < 0, raw ^ magnitude_bits, raw)


def _floor_mean(lo: Array, hi: Array) -> Array:
    # (lo + hi) // 2 without overflow.
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def smallest_mask_bisect(values: Array, count: Array, eligible: Array) -> Array:
    """The ``count`` smallest eligible entries of ``values`` (any shape), by threshold bisection.

    Finds the smallest integer key ``τ`` with ``#{key ≤ τ} ≥ count`` by bisection on the
    order-preserving integer image of the floats (32 passes in float32, 64 in float64, each a
    compare-and-count), then keeps every key ``< τ`` and the lowest-index keys equal to ``τ``.
    Unlike a sort, every pass is a streaming reduction, which is what CPUs and GPUs do best.

    Args:
      values: float32/float64 array (one budget unit).
      count: integer scalar, how many to select (clipped to the number of eligible entries).
      eligible: boolean array like ``values``; only these may be selected.

    Returns:
      Boolean array like ``values`` with exactly ``min(count, #eligible)`` entries set.
    """
    return smallest_mask_units(values[None], jnp.reshape(count, (1,)), eligible[None], "bisect")[0]


def smallest_mask_search(values: Array, count: Array, eligible: Array) -> Array:
    """Same result as :func:`smallest_mask_bisect`, in fewer counting passes.

    The bracket ``#{key ≤ lo} < count ≤ #{key ≤ hi}`` is narrowed by alternating an
    interpolation guess (on the values, from the two counts) with a bisection step on the keys,
    and the search stops as soon as a bracket end holds exactly ``count`` keys (then the keys up
    to it are the answer) or the bracket is a single key. On the smooth gradients of Frank-Wolfe
    it takes a handful of passes instead of 32 (float32); the bisection steps bound the worst case
    at twice the bisection's.
    """
    return smallest_mask_units(values[None], jnp.reshape(count, (1,)), eligible[None], "search")[0]


def smallest_mask_units(values: Array, count: Array, eligible: Array, method: str = "bisect") -> Array:
    """:func:`smallest_mask_bisect` / :func:`smallest_mask_search` for a stack of units at once.

    ``values``/``eligible``: ``(units, ...)``; ``count``: ``(units,)``. The thresholds are found
    per unit; the lowest-index tie-break (a running count, the only non-streaming step) runs only
    when some unit has more entries at its threshold than room for them.
    """
    find = _threshold_search if method == "search" else _threshold_bisect
    return _select_units(values, count, eligible, find)[0]


class ThresholdHint(NamedTuple):
    """Per-unit memory of a threshold search, carried from one selection to the next.

    ``value``: the last threshold (NaN: none yet); ``move``: how far it moved at the last call.
    """

    value: Array
    move: Array

    @classmethod
    def empty(cls, units: int, dtype) -> "ThresholdHint":
        return cls(jnp.full((units,), jnp.nan, dtype), jnp.zeros((units,), dtype))


def smallest_mask_units_hinted(
    values: Array, count: Array, eligible: Array, hint: ThresholdHint
) -> tuple[Array, ThresholdHint]:
    """:func:`smallest_mask_units` (same selection, whatever the hint) warm-started from the
    thresholds of a previous, similar selection, for iterations whose values change a little
    at a time (the gradients of Frank-Wolfe).

    Per unit, the search first counts at the hinted threshold, then gallops away from it in
    steps of twice the last move (growing ×4) until the answer is bracketed, then narrows the
    bracket as :func:`smallest_mask_search` does. When the threshold moves little this needs
    fewer counting passes than a search over the whole range (``benchmarks/bench_lmo_hint.py``
    times it inside the Frank-Wolfe loops). A stale or absurd hint costs passes, never
    correctness: every pass keeps a valid bracket.

    Returns:
      The selection and the hint for the next call.
    """
    mask, keys = _select_units(values, count, eligible, _threshold_search, hint)
    value = float_of_key(keys, values.dtype)
    move = jnp.where(jnp.isfinite(hint.value) & jnp.isfinite(value), jnp.abs(value - hint.value), 0).astype(values.dtype)
    return mask, ThresholdHint(value, move)


def _select_units(values, count, eligible, find, *extra):
    """Shared body of the unit selections: keys, per-unit threshold by ``find``, tie-break.
    Returns the selection and the threshold keys."""
    dtype = values.dtype
    int_dtype, bits = _int_type(dtype)
    info = jnp.iinfo(int_dtype)
    keys = jnp.where(eligible, sortable_keys(values), jnp.array(info.max, int_dtype))
    flat = keys.reshape(keys.shape[0], -1)
    count = jnp.minimum(jnp.asarray(count, int_dtype), jnp.sum(eligible.reshape(flat.shape), axis=-1, dtype=int_dtype))
    threshold = jax.vmap(lambda k, c, *e: find(k, c, dtype, *e))(flat, count, *extra)
    shape = (-1,) + (1,) * (values.ndim - 1)
    below = keys < threshold.reshape(shape)
    at = keys == threshold.reshape(shape)
    room = count - jnp.sum(below.reshape(flat.shape), axis=-1, dtype=int_dtype)
    spill = jnp.any(jnp.sum(at.reshape(flat.shape), axis=-1, dtype=int_dtype) > room)
    ties = lax.cond(spill, lambda: jax.vmap(lambda a: running_count(a, int_dtype))(at) <= room.reshape(shape),
                    lambda: jnp.ones_like(at))
    return (below | (ties & at)) & (count > 0).reshape(shape), threshold


def _threshold_bisect(keys: Array, count: Array, dtype) -> Array:
    """Smallest key ``τ`` with ``#{keys ≤ τ} ≥ count`` (1-D ``keys``), by bisection."""
    int_dtype, bits = _int_type(dtype)
    info = jnp.iinfo(int_dtype)
    # Invariant: #{key ≤ lo} < count ≤ #{key ≤ hi}. Finite floats never map to info.min.
    lo = jnp.min(keys) - 1
    hi = jnp.max(jnp.where(keys < info.max, keys, jnp.array(info.min, int_dtype)))

    def halve(_, bracket):
        lo, hi = bracket
        mid = _floor_mean(lo, hi)
        enough = jnp.sum(keys <= mid, dtype=int_dtype) >= count
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    return lax.fori_loop(0, bits, halve, (lo, hi))[1]


_GALLOPS = 8  # most galloping passes of a hinted search before it falls back to narrowing


def _threshold_search(keys: Array, count: Array, dtype, hint: Optional[ThresholdHint] = None) -> Array:
    """A key ``τ`` selecting the same entries as :func:`_threshold_bisect`'s (see
    :func:`smallest_mask_search`), optionally starting from a hint (see
    :func:`smallest_mask_units_hinted`).

    Every pass counts the keys at or below a trial key strictly inside the bracket
    ``#{key ≤ lo} < count ≤ #{key ≤ hi}`` and moves one end to it, so the answer is the same
    whichever trial keys are chosen; the phases only choose them: 0 probes the hint, 1 gallops
    away from it, 2 alternates an interpolation guess with a bisection step.
    """
    int_dtype, bits = _int_type(dtype)
    info = jnp.iinfo(int_dtype)
    lo = jnp.min(keys) - 1
    hi = jnp.max(jnp.where(keys < info.max, keys, jnp.array(info.min, int_dtype)))
    fcount = count.astype(jnp.float32)
    zero = jnp.zeros((), int_dtype)
    if hint is None:
        anchor, step, phase = jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.array(2, jnp.int32)
        hint_key = lo
    else:
        anchor = hint.value.astype(dtype)
        hint_key = sortable_keys(jnp.where(jnp.isfinite(anchor), anchor, 0))
        usable = jnp.isfinite(anchor) & (hint_key > lo) & (hint_key < hi)
        phase = jnp.where(usable, 0, 2).astype(jnp.int32)
        tiny = jnp.finfo(dtype).tiny
        step = jnp.maximum(jnp.maximum(2 * hint.move.astype(dtype), jnp.abs(anchor) * 2.0**-10), tiny)
    down = jnp.zeros((), bool)  # the hint held enough keys: gallop downwards

    def cond(state):
        lo, hi, _, c_hi, passes, *_ = state
        return (lo + 1 < hi) & (c_hi != count) & (passes < 2 * bits + _GALLOPS + 1)  # (hi − lo can overflow)

    def body(state):
        lo, hi, c_lo, c_hi, passes, phase, refine, step, down = state
        lo_v, hi_v = float_of_key(lo, dtype), float_of_key(hi, dtype)
        frac = (fcount - c_lo.astype(jnp.float32)) / jnp.maximum(c_hi - c_lo, 1).astype(jnp.float32)
        guess = sortable_keys(lo_v + frac.astype(dtype) * (hi_v - lo_v))
        guess = jnp.where(jnp.isfinite(lo_v) & jnp.isfinite(hi_v), guess, lo)
        narrow = jnp.where(refine % 2 == 0, guess, _floor_mean(lo, hi))
        gallop = sortable_keys(jnp.where(down, anchor - step, anchor + step))
        mid = jnp.select([phase == 0, phase == 1], [hint_key, gallop], narrow)
        mid = jnp.clip(mid, lo + 1, hi - 1)
        c = jnp.sum(keys <= mid, dtype=int_dtype)
        enough = c >= count
        # Phase 0 → 1; phase 1 → 2 once the far end of the bracket moved (or after _GALLOPS).
        crossed = enough != down
        next_phase = jnp.where(phase == 0, 1, jnp.where((phase == 1) & (crossed | (passes >= _GALLOPS)), 2, phase))
        return (jnp.where(enough, lo, mid), jnp.where(enough, mid, hi),
                jnp.where(enough, c_lo, c), jnp.where(enough, c, c_hi), passes + 1,
                next_phase.astype(jnp.int32), refine + (phase == 2), jnp.where(phase == 1, 4 * step, step),
                jnp.where(phase == 0, enough, down))

    init = (lo, hi, zero, jnp.sum(keys <= hi, dtype=int_dtype), zero, phase, zero, step, down)
    return lax.while_loop(cond, body, init)[1]


def float_of_key(keys: Array, dtype) -> Array:
    """Inverse of :func:`sortable_keys`."""
    int_dtype, bits = _int_type(dtype)
    magnitude_bits = jnp.array((1 << (bits - 1)) - 1, int_dtype)
    return lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ magnitude_bits, keys), dtype)


def running_count(flags: Array, int_dtype=jnp.int32) -> Array:
    """Inclusive running count of ``flags`` in row-major (flat) order, like
    ``cumsum(flags.ravel()).reshape(flags.shape)``, computed per row plus an offset per row: on
    row-sharded arrays only the per-row totals travel between devices, not the matrix."""
    if flags.ndim < 2:
        return jnp.cumsum(flags, dtype=int_dtype)
    within = jnp.cumsum(flags, axis=-1, dtype=int_dtype)
    totals = within[..., -1].reshape(-1)
    offsets = (jnp.cumsum(totals) - totals).reshape(flags.shape[:-1])
    return within + offsets[..., None]


def smallest_mask_topk(values: Array, count: Array, eligible: Array, max_count: int) -> Array:
    """Same result as :func:`smallest_mask_bisect`, through ``lax.top_k`` (a partial sort).

    ``max_count`` is a static upper bound on ``count``. Fast on accelerators, slow on CPU.
    """
    flat = jnp.where(eligible, values, jnp.inf).reshape(-1)
    _, index = lax.top_k(-flat, max_count)
    count = jnp.minimum(count, jnp.sum(eligible))
    take = jnp.arange(max_count) < count
    chosen = jnp.zeros(flat.shape, bool).at[index].set(take, mode="drop", unique_indices=True)
    return chosen.reshape(values.shape)


def group_ranks(better: Array) -> Array:
    """Rank of each entry within its group, given the pairwise relation.

    Args:
      better: ``(..., m, m)`` boolean, ``better[..., a, b]`` = entry ``a`` beats entry ``b``;
        must be a strict total order within each group.

    Returns:
      ``(..., m)`` integer ranks, 0 for the best entry of each group.
    """
    return jnp.sum(better, axis=-2)


def lexicographic_better(keys: tuple[Array, ...]) -> Array:
    """Pairwise "beats" relation within groups for descending lexicographic keys, index last.

    Args:
      keys: arrays of shape ``(..., m)``, most important first; larger is better. Ties on all
        keys are broken by the lower position within the group.

    Returns:
      ``(..., m, m)`` boolean, ``out[..., a, b]`` = entry ``a`` ranks before entry ``b``.
    """
    m = keys[0].shape[-1]
    position = jnp.arange(m)
    result = position[:, None] < position[None, :]
    for key in reversed(keys):
        a = key[..., :, None]
        b = key[..., None, :]
        result = (a > b) | ((a == b) & result)
    return result


def top_count_lexsort(keys: tuple[Array, ...], count: Array) -> Array:
    """The ``count`` best entries of one unit under descending lexicographic keys, index last.

    Args:
      keys: same-shape arrays, most important first; larger is better.
      count: integer scalar.

    Returns:
      Boolean array of the keys' shape with ``count`` entries set.
    """
    shape = keys[0].shape
    # jnp.lexsort sorts ascending with the last key primary, and is stable (lower index first).
    order = jnp.lexsort(tuple(-k.reshape(-1) for k in reversed(keys)))
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    return (rank < count).reshape(shape)


def top_count_units(keys: tuple[Array, ...], count: Array, method: str = "search") -> Array:
    """:func:`top_count_lexsort` for a stack of units ``(units, ...)``, the same selection, by
    threshold searches instead of a sort: per key, most important first, the unit's threshold
    among the entries still tied on the keys before it; entries strictly better are kept, those
    at the threshold go on to the next key, and the last key's ties go to the lower index. Each
    search is a few counting passes (:func:`smallest_mask_units`), so this streams where a
    lexicographic sort moves and copies every key: 5–20× faster on CPU at 7B shapes
    (``benchmarks/bench_rounding.py``), with about the sort's temporary memory.

    Args:
      keys: same-shape arrays ``(units, ...)``, most important first, larger is better; booleans
        and integers are compared as float32 (exact for the 0/1 keys the solver uses).
      count: integer scalar or ``(units,)``: how many to keep per unit.
      method: the threshold search, ``"search"`` or ``"bisect"``.

    Returns:
      Boolean array of the keys' shape with ``min(count, unit size)`` entries set per unit.
    """
    find = _threshold_search if method == "search" else _threshold_bisect
    shape = jnp.shape(keys[0])
    units = shape[0]
    per_unit = (-1,) + (1,) * (len(shape) - 1)
    chosen = jnp.zeros(shape, bool)
    eligible = jnp.ones(shape, bool)
    remaining = jnp.broadcast_to(jnp.asarray(count), (units,))
    for level, key in enumerate(keys):
        key = jnp.asarray(key)
        key = key if jnp.issubdtype(key.dtype, jnp.floating) else key.astype(jnp.float32)
        values = -key  # the smallest of −key are the largest of key
        values = jnp.where(values == 0, jnp.zeros((), values.dtype), values)  # −0.0 ties with 0.0, as in a sort
        int_dtype, _ = _int_type(values.dtype)
        remaining = remaining.astype(int_dtype)
        selected, threshold = _select_units(values, remaining, eligible, find)
        if level == len(keys) - 1:
            return chosen | selected
        ordered = sortable_keys(values)
        better = eligible & (ordered < threshold.reshape(per_unit))
        chosen = chosen | better
        remaining = remaining - jnp.sum(better.reshape(units, -1), axis=-1, dtype=int_dtype)
        eligible = eligible & (ordered == threshold.reshape(per_unit))
    return chosen


__all__ = [
    "sortable_keys",
    "top_count_units",
    "smallest_mask_bisect",
    "smallest_mask_search",
    "smallest_mask_units",
    "smallest_mask_units_hinted",
    "ThresholdHint",
    "smallest_mask_topk",
    "group_ranks",
    "lexicographic_better",
    "top_count_lexsort",
]
