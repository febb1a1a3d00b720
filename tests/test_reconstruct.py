"""Weight reconstruction for a fixed mask against a float64 direct solve, row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fw_jax.solver._objective import layer_error, weights_error
from fw_jax.solver._reconstruct import _reconstruct_jit, reconstruct


def correlated_layer(d_out, d_in, *, seed=0, rank=6, tokens=None):
    rng = np.random.default_rng(seed)
    tokens = tokens or 3 * d_in
    x = rng.standard_normal((d_in, rank)) @ rng.standard_normal((rank, tokens))
    x += 0.3 * rng.standard_normal((d_in, tokens))
    x *= np.exp(rng.standard_normal((d_in, 1)))
    return rng.standard_normal((d_out, d_in)), x @ x.T


def example_masks(d_out, d_in, seed=0):
    """A random 50% mask with one full and one empty row, and a random 2:4 mask."""
    rng = np.random.default_rng(seed)
    half = rng.random((d_out, d_in)) < 0.5
    half[0] = True
    half[1] = False
    two_four = (np.argsort(rng.random((d_out, d_in // 4, 4)), axis=-1) < 2).reshape(d_out, d_in)
    return {"half": half, "2:4": two_four}




def direct_reference(weight, gram, mask, damp):
    """Solve ``H_SS ŵ_S = (H w)_S`` for every row with numpy.linalg.solve (float64)."""
    d_in = gram.shape[0]
    hessian = gram + damp * np.mean(np.diag(gram)) * np.eye(d_in)
    out = np.zeros(weight.shape)
    for i, (w, keep) in enumerate(zip(weight, mask)):
        support = np.flatnonzero(keep)
        if support.size:
            out[i, support] = np.linalg.solve(hessian[np.ix_(support, support)], (w @ hessian)[support])
    return out


CASES = [
    ("cg", dict(tol=1e-12, max_iter=400)),
    ("cg", dict(tol=1e-12, max_iter=400, jacobi=False)),
    ("admm", dict(tol=1e-12, max_iter=4000)),
    ("direct", dict()),
]


@pytest.mark.parametrize("method, options", CASES, ids=["cg", "cg-plain", "admm", "direct"])
@pytest.mark.parametrize("mask_name", ["half", "2:4"])
def test_matches_float64_direct_solve(method, options, mask_name):
    weight, gram = correlated_layer(12, 48, seed=1)
    mask = example_masks(12, 48)[mask_name]
    expected = direct_reference(weight, gram, mask, 0.01)
    got = np.asarray(reconstruct(weight, gram, mask, damp=0.01, method=method, **options))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got[~mask], 0.0)  # exactly zero, not just small
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)


@pytest.mark.parametrize("method", ["cg", "admm", "direct"])
@pytest.mark.parametrize("damp", [0.0, 0.01, 0.1])
def test_error_not_above_masked_weights(method, damp):
    # With default tolerances, in float32 as used on real layers.
    weight, gram = correlated_layer(16, 64, seed=2)
    for mask in example_masks(16, 64, seed=3).values():
        before = float(layer_error(weight, gram, mask))
        new_weight = reconstruct(weight.astype(np.float32), gram.astype(np.float32), mask, damp=damp, method=method)
        after = float(weights_error(weight, gram, np.asarray(new_weight, np.float64)))
        assert new_weight.dtype == jnp.float32
        assert np.all(np.asarray(new_weight)[~mask] == 0)
        assert after < 0.5 * before  # not above the masked weights' error, by a wide margin on correlated inputs


def test_undamped_is_least_squares_on_support():
    weight, gram = correlated_layer(6, 32, seed=4)
    mask = example_masks(6, 32, seed=4)["2:4"]
    got = np.asarray(reconstruct(weight, gram, mask, damp=0.0, tol=1e-13, max_iter=500))
    # Optimality: the gradient (ŵ − w) G vanishes on the support.
    gradient = (got - weight) @ gram
    assert np.abs(gradient[mask]).max() <= 1e-7 * np.abs(weight @ gram).max()


def test_float32_close_to_float64_solution():
    weight, gram = correlated_layer(16, 64, seed=5)
    mask = example_masks(16, 64, seed=5)["half"]
    expected = direct_reference(weight, gram, mask, 0.01)
    got = np.asarray(reconstruct(weight.astype(np.float32), gram.astype(np.float32), mask, tol=1e-6))
    optimum = float(weights_error(weight, gram, expected))
    assert float(weights_error(weight, gram, got.astype(np.float64))) <= optimum * (1 + 1e-3)


def test_mask_dtypes_and_full_mask():
    weight, gram = correlated_layer(8, 32, seed=6)
    mask = example_masks(8, 32, seed=6)["half"]
    as_bool = reconstruct(weight, gram, mask, tol=1e-12)
    as_float = reconstruct(weight, gram, mask.astype(np.float32), tol=1e-12)
    np.testing.assert_array_equal(np.asarray(as_bool), np.asarray(as_float))
    full = reconstruct(weight, gram, np.ones(weight.shape, bool))
    np.testing.assert_array_equal(np.asarray(full), weight)  # nothing pruned: nothing to fix


def test_jit_no_recompile_for_same_shapes():
    weight, gram = correlated_layer(8, 32, seed=7)
    mask = example_masks(8, 32, seed=7)["half"]
    first = reconstruct(weight, gram, mask)
    size = _reconstruct_jit._cache_size()
    second = reconstruct(weight + 1, gram * 2, ~mask, damp=0.05, tol=1e-6, max_iter=50)
    assert _reconstruct_jit._cache_size() == size
    assert not np.allclose(np.asarray(first), np.asarray(second))
    # And it composes with an outer jit and vmap over layers of the same shape.
    stacked = jax.jit(jax.vmap(lambda w, g, m: reconstruct(w, g, m, tol=1e-12)))(
        jnp.stack([weight, weight + 1]), jnp.stack([gram, gram]), jnp.stack([mask, mask])
    )
    np.testing.assert_allclose(np.asarray(stacked[0]), np.asarray(reconstruct(weight, gram, mask, tol=1e-12)), atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask=np.ones((4, 7), bool)), "mask must have the weight's shape \\(4, 8\\)"),
        (dict(mask=np.full((4, 8), 0.5)), "mask must be binary"),
        (dict(gram=np.eye(4)), "gram must be \\(8, 8\\), the Gram matrix"),
        (dict(weight=np.full((4, 8), np.inf)), "weight contains non-finite"),
        (dict(gram=np.triu(np.ones((8, 8)))), "gram is not symmetric"),
        (dict(gram=-np.eye(8)), "negative diagonal"),
        (dict(damp=float("nan")), "damp must be a finite number ≥ 0"),
        (dict(damp=-1.0), "damp must be a finite number ≥ 0"),
        (dict(method="lsqr"), "method must be one of"),
        (dict(tol=-1.0), "tol must be a finite number ≥ 0"),
        (dict(max_iter=2.5), "max_iter must be an int ≥ 0"),
        (dict(rho=0.0), "rho must be a finite number > 0"),
    ],
)
def test_input_validation(kwargs, message):
    args = dict(weight=np.ones((4, 8)), gram=np.eye(8), mask=np.ones((4, 8), bool))
    args.update(kwargs)
    weight, gram, mask = args.pop("weight"), args.pop("gram"), args.pop("mask")
    with pytest.raises(ValueError, match=message):
        reconstruct(weight, gram, mask, **args)
