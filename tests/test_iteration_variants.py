"""Compile-time variants of the Frank-Wolfe iteration: low-precision products give the same
answers as the float iteration (issue 6), and the options are checked."""

import numpy as np
import pytest

import fw_jax
from fw_jax import SolverOptions
from solver_problems import best_row_error, correlated_problem
from tolerances import assert_le

BUDGETS = [16, fw_jax.NM(2, 4), fw_jax.LayerBudget(200)]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_bfloat16_products_keep_the_error_and_a_valid_bound(budget):
    weight, gram = correlated_problem(np.random.default_rng(3), 16, 32, dtype=np.float32)
    full = fw_jax.solve_layer(weight, gram, budget, options=SolverOptions(max_iter=100))
    low = fw_jax.solve_layer(weight, gram, budget, options=SolverOptions(max_iter=100, precision="bfloat16"))
    assert_le(low.loss, low.warm_loss, rtol=1e-6)  # float32 errors of two masks
    assert_le(low.loss, full.loss, rtol=0.02)  # bfloat16 iterations cost at most 2% here
    assert_le(low.lower_bound, full.loss, rtol=1e-5)  # a bound is below any mask's error (float32)


def test_bfloat16_bound_below_exhaustive_best():
    weight, gram = correlated_problem(np.random.default_rng(4), 4, 12, dtype=np.float32)
    sol = fw_jax.solve_layer(weight, gram, 5, options=SolverOptions(max_iter=300, precision="bfloat16"))
    best = sum(best_row_error(weight[i].astype(np.float64), gram.astype(np.float64), 5) for i in range(4))
    assert_le(sol.lower_bound, best, rtol=1e-5)
    assert float(sol.lower_bound) > 0.3 * best


def test_solver_options_are_checked():
    weight, gram = correlated_problem(np.random.default_rng(5), 4, 8)
    for bad, match in [(dict(precision="fp8"), "precision"), (dict(lmo_method="sort"), "lmo_method"),
                       (dict(max_iter=-1), "max_iter"), (dict(max_iter=2.5), "max_iter"),
                       (dict(refresh_every=0), "refresh_every"), (dict(step_rule="newton"), "step rule"),
                       (dict(swaps="yes"), "swaps")]:
        with pytest.raises(ValueError, match=match):
            SolverOptions(**bad)
    with pytest.raises(ValueError, match="SolverOptions"):
        fw_jax.solve_layer(weight, gram, 4, options={"max_iter": 3})
    with pytest.raises(TypeError):  # the tuning is not a keyword of solve_layer any more
        fw_jax.solve_layer(weight, gram, 4, max_iter=3)


def test_refresh_every_reaches_the_swaps(monkeypatch):
    """``SolverOptions.refresh_every`` is the period of the 1-swaps' dense refresh too (it was a
    literal 64 there), and how often the products are refreshed changes no mask here (it only
    bounds float drift)."""
    from fw_jax.solver import _budgets

    weight, gram = correlated_problem(np.random.default_rng(6), 6, 10)
    seen = []
    original = _budgets.PerRow.refine

    def spy(self, weight, gram, mask, frozen, max_swaps, refresh_every, product=None):
        seen.append(refresh_every)
        return original(self, weight, gram, mask, frozen, max_swaps, refresh_every, product)

    monkeypatch.setattr(_budgets.PerRow, "refine", spy)
    # periods no other test uses, so that both calls trace (and so call refine) afresh
    every_step = fw_jax.solve_layer(weight, gram, 4, options=SolverOptions(max_iter=17, refresh_every=1))
    sparse = fw_jax.solve_layer(weight, gram, 4, options=SolverOptions(max_iter=17, refresh_every=5))
    assert seen == [1, 5]
    np.testing.assert_array_equal(np.asarray(every_step.mask), np.asarray(sparse.mask))
