"""Every LMO against brute-force enumeration of all vertices, ties and fixed entries included."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fw_jax.solver import NMLMO, TopKLMO, vertices
from fw_jax.solver._select import smallest_mask_bisect, sortable_keys


def brute_force_capped(g, fixed, k):
    """argmin ⟨g, v⟩ over binary v ⊇ fixed with Σv ≤ k; ties: fewest ones, then the
    lexicographically smallest sorted index tuple."""
    flat_g, flat_f = g.reshape(-1), fixed.reshape(-1)
    n = flat_g.size
    free = [i for i in range(n) if not flat_f[i]]
    base = [i for i in range(n) if flat_f[i]]
    best = None
    for size in range(0, k - len(base) + 1):
        for combo in itertools.combinations(free, size):
            chosen = tuple(sorted(base + list(combo)))
            key = (float(sum(flat_g[list(chosen)])), len(chosen), chosen)
            if best is None or key < best:
                best = key
    v = np.zeros(n)
    v[list(best[2])] = 1
    return v.reshape(g.shape)


def brute_force_nm(g, fixed, n, m):
    blocks = [
        brute_force_capped(g[i : i + m], fixed[i : i + m], n) for i in range(0, g.size, m)
    ]
    return np.concatenate(blocks)


def tied_gradients(rng, shape, levels=4):
    # Few distinct values (negative, zero and positive) so ties are everywhere.
    return rng.integers(-levels, 2, size=shape).astype(np.float64)


@pytest.mark.parametrize("method", ["bisect", "search", "top_k"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_capped_lmo_matches_brute_force_on_rows(method, dtype):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        k = int(rng.integers(1, n + 1))
        g = tied_gradients(rng, (n,)) if trial % 2 else rng.normal(size=n)
        fixed = rng.random(n) < 0.25
        while fixed.sum() > k:
            fixed[np.flatnonzero(fixed)[0]] = False
        lmo = TopKLMO(k, method)
        got = np.asarray(jax.jit(lmo.unit)(jnp.asarray(g, dtype), jnp.asarray(fixed)))
        want = brute_force_capped(g.astype(dtype), fixed, k)
        np.testing.assert_array_equal(got, want, err_msg=f"g={g} fixed={fixed} k={k}")


@pytest.mark.parametrize("method", ["bisect", "search", "top_k"])
def test_capped_lmo_matches_brute_force_on_matrices(method):
    # A layer budget: the unit is a whole matrix, ties broken by row-major index.
    rng = np.random.default_rng(1)
    for _ in range(20):
        g = tied_gradients(rng, (3, 3))
        k = int(rng.integers(1, 10))
        fixed = rng.random((3, 3)) < 0.2
        while fixed.sum() > k:
            fixed[np.unravel_index(np.flatnonzero(fixed)[0], (3, 3))] = False
        got = np.asarray(TopKLMO(k, method).unit(jnp.asarray(g), jnp.asarray(fixed)))
        np.testing.assert_array_equal(got, brute_force_capped(g, fixed, k))


def test_nm_lmo_matches_brute_force():
    rng = np.random.default_rng(2)
    for n, m in [(1, 2), (2, 4), (1, 4), (3, 4), (2, 3), (4, 4)]:
        for trial in range(15):
            g = tied_gradients(rng, (3 * m,)) if trial % 2 else rng.normal(size=3 * m)
            fixed = np.zeros(3 * m, bool)
            for b in range(3):
                count = int(rng.integers(0, n + 1))
                fixed[b * m + rng.permutation(m)[:count]] = True
            got = np.asarray(jax.jit(NMLMO(n, m).unit)(jnp.asarray(g), jnp.asarray(fixed)))
            np.testing.assert_array_equal(got, brute_force_nm(g, fixed, n, m), err_msg=f"{n}:{m} g={g}")


def test_lmos_vmap_over_rows():
    rng = np.random.default_rng(3)
    g = tied_gradients(rng, (6, 8))
    fixed = np.zeros((6, 8), bool)
    for lmo, brute in [
        (TopKLMO(3), lambda row, f: brute_force_capped(row, f, 3)),
        (NMLMO(2, 4), lambda row, f: brute_force_nm(row, f, 2, 4)),
    ]:
        got = np.asarray(jax.vmap(lmo.unit)(jnp.asarray(g), jnp.asarray(fixed)))
        stacked = np.asarray(jax.jit(lambda g, f, lmo=lmo: vertices(lmo, g, f))(jnp.asarray(g), jnp.asarray(fixed)))
        np.testing.assert_array_equal(stacked, got)  # the protocol's stacked call: the same vertices
        want = np.stack([brute(g[i], fixed[i]) for i in range(6)])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sortable_keys_preserve_order(dtype):
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype)
    keys = np.asarray(sortable_keys(jnp.asarray(values)))
    assert np.all(np.diff(keys) >= 0)
    assert np.all(np.diff(keys)[values[1:] != values[:-1]] > 0)


def test_bisect_selection_counts_and_ties():
    values = jnp.asarray(np.array([2.0, 1.0, 1.0, 1.0, 0.5, 3.0]))
    eligible = jnp.ones(6, bool)
    for count in range(7):
        chosen = np.asarray(smallest_mask_bisect(values, count, eligible))
        assert chosen.sum() == count
    # Three-way tie at 1.0 with room for two: the two lowest indices.
    np.testing.assert_array_equal(
        np.asarray(smallest_mask_bisect(values, 3, eligible)), [0, 1, 1, 0, 1, 0]
    )


def brute_force_hypersimplex(g, fixed, k, support=None, maximise=False):
    """Best vertex with exactly k ones ⊇ fixed (and, for away vertices, inside the face of m):
    min (or max) ⟨g, v⟩, ties to the lexicographically smallest index tuple."""
    n = g.size
    must = set(np.flatnonzero(fixed)) | (set(np.flatnonzero(support == 1)) if support is not None else set())
    banned = set(np.flatnonzero(support == 0)) if support is not None else set()
    free = [i for i in range(n) if i not in must and i not in banned]
    best = None
    for combo in itertools.combinations(free, k - len(must)):
        chosen = tuple(sorted(must | set(combo)))
        value = float(sum(g[list(chosen)]))
        key = (-value if maximise else value, chosen)
        if best is None or key < best:
            best = key
    v = np.zeros(n)
    v[list(best[1])] = 1
    return v


@pytest.mark.parametrize("method", ["bisect", "search", "top_k"])
def test_exact_and_away_oracles_match_brute_force(method):
    rng = np.random.default_rng(4)
    for _ in range(30):
        n = int(rng.integers(2, 9))
        k = int(rng.integers(1, n))
        g = tied_gradients(rng, (n,))
        fixed = np.zeros(n, bool)
        fixed[rng.permutation(n)[: int(rng.integers(0, k))]] = True
        lmo = TopKLMO(k, method, exact=True)
        got = np.asarray(lmo.unit(jnp.asarray(g), jnp.asarray(fixed)))
        np.testing.assert_array_equal(got, brute_force_hypersimplex(g, fixed, k))
        # A point of the face: ones (incl. fixed), zeros, and fractional entries summing to the rest.
        m = np.zeros(n)
        m[fixed] = 1
        rest = [i for i in range(n) if not fixed[i]]
        room = k - fixed.sum()
        frac = rng.permutation(rest)[: room + 1] if room + 1 <= len(rest) else rest
        if room > 0 and len(frac) > room:
            m[frac] = room / len(frac)
        elif room > 0:
            m[rest[:room]] = 1
        got = np.asarray(lmo.away(jnp.asarray(g)[None], jnp.asarray(m)[None], jnp.asarray(fixed)[None])[0])
        support = np.where(m >= 1, 1, np.where(m <= 0, 0, -1))
        np.testing.assert_array_equal(got, brute_force_hypersimplex(g, fixed, k, support, maximise=True))


def test_nm_exact_and_away_oracles():
    rng = np.random.default_rng(5)
    for _ in range(20):
        g = tied_gradients(rng, (8,))
        fixed = np.zeros(8, bool)
        lmo = NMLMO(2, 4, exact=True)
        got = np.asarray(lmo.unit(jnp.asarray(g), jnp.asarray(fixed)))
        want = np.concatenate([brute_force_hypersimplex(g[i : i + 4], fixed[i : i + 4], 2) for i in (0, 4)])
        np.testing.assert_array_equal(got, want)
        m = np.array([1, 0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3, 1])
        got = np.asarray(lmo.away(jnp.asarray(g), jnp.asarray(m), jnp.asarray(fixed)))
        want = []
        for i in (0, 4):
            block = m[i : i + 4]
            support = np.where(block >= 1, 1, np.where(block <= 0, 0, -1))
            want.append(brute_force_hypersimplex(g[i : i + 4], fixed[i : i + 4], 2, support, maximise=True))
        np.testing.assert_array_equal(got, np.concatenate(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_search_selection_equals_bisection(dtype):
    """Interpolation search selects exactly what bisection selects: ties, infinities, signed
    zeros, quantized values, ineligible entries, matrices (layer units), every count."""
    from fw_jax.solver._select import smallest_mask_search

    rng = np.random.default_rng(7)
    search = jax.jit(smallest_mask_search)
    bisect = jax.jit(smallest_mask_bisect)
    for trial in range(60):
        shape = [(17,), (4, 9), (3, 2, 8)][trial % 3]
        kind = trial % 5
        if kind == 0:
            values = rng.normal(size=shape)
        elif kind == 1:
            values = np.round(rng.normal(size=shape) * 2) / 2  # many exact ties
        elif kind == 2:
            values = rng.standard_cauchy(size=shape) * 1e30  # huge spread
        elif kind == 3:
            values = rng.choice([-np.inf, -0.0, 0.0, 1e-38, -1e-38, 3.0, np.inf], size=shape)
        else:
            values = np.full(shape, 2.5)
        values = jnp.asarray(values.astype(dtype))
        eligible = jnp.asarray(rng.random(shape) < 0.8)
        for count in range(0, values.size + 2, max(1, values.size // 7)):
            got = np.asarray(search(values, count, eligible))
            want = np.asarray(bisect(values, count, eligible))
            np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}, count {count}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hinted_selection_equals_bisection_whatever_the_hint(dtype):
    """A warm-started threshold search selects exactly what bisection selects, from good hints
    (the previous, slightly perturbed values), stale or absurd hints (NaN, ±inf, huge, zero
    moves, huge moves) and on the awkward value sets of the test above; the hint it returns is
    the threshold of its own selection."""
    from fw_jax.solver._select import (
        ThresholdHint,
        smallest_mask_units,
        smallest_mask_units_hinted,
    )

    rng = np.random.default_rng(11)
    hinted = jax.jit(smallest_mask_units_hinted)
    bisect = jax.jit(lambda v, c, e: smallest_mask_units(v, c, e, "bisect"))
    units, n = 5, 24
    hint = ThresholdHint.empty(units, dtype)
    values = rng.normal(size=(units, n))
    for trial in range(80):
        kind = trial % 8
        if kind < 3:  # slow drift: the hint is good
            values = values + 0.02 * rng.normal(size=values.shape)
        elif kind == 3:
            values = np.round(rng.normal(size=(units, n)) * 2) / 2
        elif kind == 4:
            values = rng.standard_cauchy(size=(units, n)) * 1e30
        elif kind == 5:
            values = rng.choice([-np.inf, -0.0, 0.0, 1e-38, -1e-38, 3.0, np.inf], size=(units, n))
        elif kind == 6:
            hint = ThresholdHint(
                jnp.asarray(rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e-30, 0.0], size=units).astype(dtype)),
                jnp.asarray(rng.choice([0.0, 1e-30, 1e30, np.inf], size=units).astype(dtype)),
            )
        else:
            values = rng.normal(size=(units, n)) * 10.0 ** rng.integers(-20, 20)
        v = jnp.asarray(values.astype(dtype))
        eligible = jnp.asarray(rng.random((units, n)) < 0.85)
        count = jnp.asarray(rng.integers(0, n + 2, size=units))
        got, hint = hinted(v, count, eligible, hint)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(bisect(v, count, eligible)), err_msg=f"trial {trial}")
        # the returned hint reproduces the selection: nothing selected lies above it
        chosen = np.asarray(got)
        above = np.asarray(v) > np.asarray(hint.value)[:, None]
        assert not np.any(chosen & above & ~np.isnan(np.asarray(hint.value))[:, None]), f"trial {trial}"


def test_oracle_state_does_not_change_the_vertices():
    """The threshold oracle's state (its last thresholds) carried along a drifting gradient
    sequence gives the vertices of cold calls, plain and exact, with fixed entries."""
    rng = np.random.default_rng(3)
    g = rng.normal(size=(6, 40))
    fixed = jnp.asarray(rng.random((6, 40)) < 0.2)
    assert TopKLMO(15, "top_k").init(6, jnp.float32) == () and TopKLMO(15, hint=False).init(6, jnp.float32) == ()
    assert NMLMO(2, 4).init(6, jnp.float32) == ()
    for exact in (False, True):
        lmo, cold = TopKLMO(15, "search", exact), TopKLMO(15, "search", exact, hint=False)
        state = lmo.init(6, jnp.float32)
        for _ in range(20):
            g = g + 0.05 * rng.normal(size=g.shape)
            gj = jnp.asarray(g, jnp.float32)
            vertex, state = jax.jit(lmo)(gj, fixed, state)
            np.testing.assert_array_equal(np.asarray(vertex), np.asarray(cold(gj, fixed, ())[0]))
    with pytest.raises(ValueError, match="method"):
        TopKLMO(3, "sort")


def _lexicographic_top(keys, count):
    """Independent reference: per unit, Python's tuple order (larger first, then lower index)."""
    units, n = keys[0].shape
    out = np.zeros((units, n), bool)
    for u in range(units):
        order = sorted(range(n), key=lambda j: tuple(-float(k[u, j]) for k in keys) + (j,))
        out[u, order[:count]] = True
    return out


@pytest.mark.parametrize("method", ["search", "bisect"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_threshold_top_count_equals_the_lexicographic_order_with_ties(method, dtype):
    """The rounding's selection (``top_count_units``, no sort) keeps what a lexicographic order
    keeps, ties broken by the next key and then the lower index, −0.0 tied with 0.0, booleans
    as keys, the count traced under jit."""
    from fw_jax.solver._select import top_count_units

    rng = np.random.default_rng(3)
    units, n = 4, 23
    fixed = rng.random((units, n)) < 0.3
    relaxed = (np.round(rng.random((units, n)) * 2) / 2 * np.where(rng.random((units, n)) < 0.5, 1, -1)).astype(dtype)
    scores = np.round(rng.random((units, n)) * 4).astype(dtype)  # many exact ties left for the index
    keys = (fixed, relaxed, scores)
    select = jax.jit(lambda k, c: top_count_units(k, c, method))
    for count in (0, 1, 7, 11, 23):
        for used in (keys[:1], keys[1:], keys):
            got = np.asarray(select(tuple(jnp.asarray(k) for k in used), jnp.asarray(count)))
            np.testing.assert_array_equal(got, _lexicographic_top(used, count), err_msg=f"count {count}, {len(used)} keys")
