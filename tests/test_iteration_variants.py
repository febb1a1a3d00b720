"""Compile-time variants of the Frank-Wolfe iteration: incremental products and low-precision
products give the same answers as the dense float iteration (issue 6)."""

import jax
import numpy as np
import pytest

import fw_jax
from solver_problems import best_row_error, correlated_problem
from tolerances import assert_le

BUDGETS = [16, fw_jax.NM(2, 4), fw_jax.LayerBudget(200)]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("rule", ["exact", "open_loop"])
@pytest.mark.parametrize("max_changes", [6, 12])
def test_incremental_product_equals_dense(budget, rule, max_changes):
    # On this problem (32 inputs) consecutive vertices differ in 6-16 entries per row: a cap of 6
    # always falls back to the dense product, a cap of 12 mixes both paths.
    weight, gram = correlated_problem(np.random.default_rng(0), 16, 32)  # float64 (conftest enables x64)
    options = dict(max_iter=150, step_rule=rule, tol=0.0)
    dense = fw_jax.solve_layer(weight, gram, budget, **options)
    inc = fw_jax.solve_layer(weight, gram, budget, product="incremental", max_changes=max_changes, refresh_every=50, **options)
    assert int(dense.sparse_updates) == 0
    if max_changes == 12:
        assert int(inc.sparse_updates) > 10  # the incremental path itself is exercised
    np.testing.assert_allclose(np.asarray(inc.relaxed_mask), np.asarray(dense.relaxed_mask), atol=1e-9)
    np.testing.assert_allclose(float(inc.relaxed_loss), float(dense.relaxed_loss), rtol=1e-10)
    np.testing.assert_allclose(float(inc.lower_bound), float(dense.lower_bound), rtol=1e-9)
    assert np.array_equal(np.asarray(inc.mask), np.asarray(dense.mask))


def test_incremental_product_in_float32_stays_close_and_under_jit():
    weight, gram = correlated_problem(np.random.default_rng(1), 24, 48, dtype=np.float32)
    solve = jax.jit(lambda w, g: fw_jax.solve_layer(w, g, 24, product="incremental", max_changes=20, max_iter=200, tol=0.0))
    inc = solve(weight, gram)
    dense = fw_jax.solve_layer(weight, gram, 24, max_iter=200, tol=0.0)
    assert int(inc.sparse_updates) > 0
    np.testing.assert_allclose(float(inc.relaxed_loss), float(dense.relaxed_loss), rtol=1e-4)
    np.testing.assert_allclose(float(inc.loss), float(dense.loss), rtol=1e-4)


def test_changed_rows_product_matches_dense_product():
    from fw_jax.solver._frank_wolfe import changed_rows_product

    rng = np.random.default_rng(2)
    gram = rng.normal(size=(20, 20))
    delta = np.zeros((3, 5, 20))
    for row in delta.reshape(-1, 20):
        idx = rng.choice(20, size=rng.integers(0, 5), replace=False)
        row[idx] = rng.choice([-1.0, 1.0], size=idx.size) * rng.uniform(0.5, 2, size=idx.size)
    got = np.asarray(changed_rows_product(jax.numpy.asarray(delta), jax.numpy.asarray(gram), 4))
    np.testing.assert_allclose(got, delta @ gram, atol=1e-12)


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_bfloat16_products_keep_the_error_and_a_valid_bound(budget):
    weight, gram = correlated_problem(np.random.default_rng(3), 16, 32, dtype=np.float32)
    full = fw_jax.solve_layer(weight, gram, budget, max_iter=100)
    low = fw_jax.solve_layer(weight, gram, budget, max_iter=100, precision="bfloat16")
    assert_le(low.loss, low.warm_loss, rtol=1e-6)  # float32 errors of two masks
    assert_le(low.loss, full.loss, rtol=0.02)  # bfloat16 iterations cost at most 2% here
    assert_le(low.lower_bound, full.loss, rtol=1e-5)  # a bound is below any mask's error (float32)


def test_bfloat16_bound_below_exhaustive_best():
    weight, gram = correlated_problem(np.random.default_rng(4), 4, 12, dtype=np.float32)
    sol = fw_jax.solve_layer(weight, gram, 5, max_iter=300, precision="bfloat16")
    best = sum(best_row_error(weight[i].astype(np.float64), gram.astype(np.float64), 5) for i in range(4))
    assert_le(sol.lower_bound, best, rtol=1e-5)
    assert float(sol.lower_bound) > 0.3 * best


def test_variant_options_are_checked():
    weight, gram = correlated_problem(np.random.default_rng(5), 4, 8)
    with pytest.raises(ValueError, match="product"):
        fw_jax.solve_layer(weight, gram, 4, product="sparse")
    with pytest.raises(ValueError, match="vanilla"):
        fw_jax.solve_layer(weight, gram, 4, product="incremental", pairwise=True)
    with pytest.raises(ValueError, match="max_changes"):
        fw_jax.solve_layer(weight, gram, 4, product="incremental", max_changes=0)
    with pytest.raises(ValueError, match="precision"):
        fw_jax.solve_layer(weight, gram, 4, precision="fp8")
