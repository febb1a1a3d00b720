"""The published recipe (plain implementation) against solve_layer's loop in open-loop mode."""

import numpy as np
import pytest

import fw_jax
from fw_jax import SolverOptions
from fw_jax.solver._published import sparsefw_published
from solver_problems import correlated_problem


@pytest.mark.parametrize("budget", [fw_jax.PerRow(6), fw_jax.NM(2, 4), fw_jax.LayerBudget(48)], ids=str)
def test_open_loop_solver_reproduces_the_plain_published_iteration(budget):
    rng = np.random.default_rng(0)
    weight, gram = correlated_problem(rng, 8, 12)
    plain = sparsefw_published(weight, gram, budget, alpha=0.5, iterations=150)
    ours = fw_jax.solve_layer(weight, gram, budget, alpha=0.5, tol=0.0, options=SolverOptions(step_rule="open_loop", max_iter=150, swaps=False))
    np.testing.assert_allclose(float(ours.relaxed_loss), float(plain.relaxed_loss), rtol=1e-9)
    np.testing.assert_allclose(float(plain.warm_loss), float(ours.warm_loss), rtol=1e-12)
    # The published recipe may round worse than its warm start; ours never does.
    assert float(ours.loss) <= min(float(plain.loss), float(plain.warm_loss)) * (1 + 1e-12)


@pytest.mark.parametrize("method", ["bisect", "search"])
def test_published_threshold_oracles_agree_with_top_k(method):
    rng = np.random.default_rng(1)
    weight, gram = correlated_problem(rng, 6, 16)
    a = sparsefw_published(weight, gram, 8, iterations=60, lmo_method="top_k")
    b = sparsefw_published(weight, gram, 8, iterations=60, lmo_method=method)
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_array_equal(np.asarray(a.relaxed_loss), np.asarray(b.relaxed_loss))
