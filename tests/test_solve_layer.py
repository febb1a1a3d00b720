"""solve_layer: budgets, guarantees, certificates, the QP optimum, compilation and bad input."""

import clarabel
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import fw_jax
from fw_jax import SolverOptions
from fw_jax.solver._solve import _solve
from tolerances import assert_le
from solver_problems import (
    best_layer_error,
    best_nm_row_error,
    best_row_error,
    correlated_problem,
    row_error,
)

BUDGETS = [fw_jax.PerRow(6), fw_jax.NM(2, 4), fw_jax.LayerBudget(40)]


def budget_counts_ok(mask, budget):
    mask = np.asarray(mask)
    if isinstance(budget, fw_jax.PerRow):
        return np.all(mask.sum(1) == budget.k)
    if isinstance(budget, fw_jax.NM):
        d_out, d_in = mask.shape
        return np.all(mask.reshape(d_out, -1, budget.m).sum(-1) == budget.n)
    return mask.sum() == budget.k


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_meets_budget_keeps_fixed_and_beats_warm(budget, alpha, dtype):
    rng = np.random.default_rng(0)
    weight, gram = correlated_problem(rng, 8, 12, dtype=dtype)
    sol = fw_jax.solve_layer(weight, gram, budget, alpha=alpha, options=SolverOptions(max_iter=100))
    mask = np.asarray(sol.mask)
    assert mask.dtype == bool and mask.shape == weight.shape
    assert budget_counts_ok(mask, budget)
    assert np.all(mask[np.asarray(sol.fixed)])
    if alpha > 0:
        assert np.asarray(sol.fixed).sum() > 0
    assert float(sol.loss) <= float(sol.warm_loss) * (1 + 1e-6)
    assert float(sol.lower_bound) <= float(sol.loss) * (1 + 1e-6)
    # The reported error is the true error of the returned mask.
    true = sum(row_error(weight[i].astype(np.float64), gram.astype(np.float64), mask[i]) for i in range(8))
    np.testing.assert_allclose(float(sol.loss), true, rtol=1e-4 if dtype == np.float32 else 1e-10)
    assert sol.mask.dtype == jnp.bool_


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    warm=st.sampled_from(["magnitude", "wanda", "ria"]),
    alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    ties=st.booleans(),
    dead=st.booleans(),
)
def test_never_worse_than_warm_start_on_any_input(seed, warm, alpha, ties, dead):
    rng = np.random.default_rng(seed)
    weight, gram = correlated_problem(rng, 6, 8)
    if ties:  # dequantized weights: few distinct magnitudes
        weight = np.round(weight * 2) / 2
    if dead:  # an input channel that never fires
        gram[:, 3] = 0
        gram[3, :] = 0
    for budget in (fw_jax.PerRow(3), fw_jax.NM(1, 2)):
        sol = fw_jax.solve_layer(weight, gram, budget, warm_start=warm, alpha=alpha, options=SolverOptions(max_iter=30))
        assert budget_counts_ok(sol.mask, budget)
        assert float(sol.loss) <= float(sol.warm_loss) * (1 + 1e-9) + 1e-9
        assert np.all(np.asarray(sol.row_loss) >= -1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_lower_bound_below_exhaustive_best_per_row_and_nm(alpha):
    rng = np.random.default_rng(1)
    weight, gram = correlated_problem(rng, 4, 12)
    sol = fw_jax.solve_layer(weight, gram, 5, alpha=alpha, options=SolverOptions(max_iter=300))
    best = sum(best_row_error(weight[i], gram, 5) for i in range(4))
    assert_le(sol.lower_bound, best, rtol=1e-9)
    assert_le(best, sol.loss, rtol=1e-9)
    assert float(sol.lower_bound) > 0.3 * best  # the bound says something

    sol = fw_jax.solve_layer(weight, gram, fw_jax.NM(2, 4), alpha=alpha, options=SolverOptions(max_iter=300))
    best = sum(best_nm_row_error(weight[i], gram, 2, 4) for i in range(4))
    assert_le(sol.lower_bound, best, rtol=1e-9)
    assert_le(best, sol.loss, rtol=1e-9)


def test_mask_lower_bound_certifies_a_mask_chosen_for_another_gram():
    rng = np.random.default_rng(3)
    weight, gram = correlated_problem(rng, 4, 12)
    shrunk = 0.5 * gram + 0.5 * np.diag(np.diag(gram))
    for budget, best in [
        (5, sum(best_row_error(weight[i], gram, 5) for i in range(4))),
        (fw_jax.NM(2, 4), sum(best_nm_row_error(weight[i], gram, 2, 4) for i in range(4))),
    ]:
        sol = fw_jax.solve_layer(weight, shrunk, budget, options=SolverOptions(max_iter=300))
        bound = float(fw_jax.mask_lower_bound(weight, gram, budget, sol.relaxed_mask, sol.mask))
        on_gram = fw_jax.solve_layer(weight, gram, budget, options=SolverOptions(max_iter=300))
        assert_le(bound, best, rtol=1e-9)
        assert bound > 0.2 * best  # from a nearby relaxed point the bound still says something
        # More points can only raise it; the bound at G's own relaxed optimum is FW's.
        tighter = float(fw_jax.mask_lower_bound(weight, gram, budget, sol.relaxed_mask, on_gram.relaxed_mask))
        assert_le(tighter, best, rtol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        fw_jax.mask_lower_bound(weight, gram, 5, sol.mask[:2])
    with pytest.raises(ValueError, match="at least one point"):
        fw_jax.mask_lower_bound(weight, gram, 5)


def test_lower_bound_below_exhaustive_best_layer_budget():
    rng = np.random.default_rng(2)
    weight, gram = correlated_problem(rng, 3, 6)
    budget = fw_jax.LayerBudget(8)
    sol = fw_jax.solve_layer(weight, gram, budget, options=SolverOptions(max_iter=300))
    best = best_layer_error(weight, gram, 8)
    assert_le(sol.lower_bound, best, rtol=1e-9)
    assert_le(best, sol.loss, rtol=1e-9)


def qp_row_optimum(w, gram, k, fixed):
    """min (w⊙(1−m))ᵀ G (w⊙(1−m)) over 0 ≤ m ≤ 1, Σm ≤ k, m_F = 1, by Clarabel."""
    n = w.size
    dg = np.diag(w) @ gram @ np.diag(w)
    P = sp.csc_matrix(np.triu(2 * dg))
    q = -2 * (np.diag(w) @ gram @ w)
    rows = [-np.eye(n), np.eye(n), np.ones((1, n))]
    A = np.vstack(rows)
    b = np.concatenate([np.zeros(n), np.ones(n), [k]])
    cones = [clarabel.NonnegativeConeT(2 * n + 1)]
    if fixed.any():
        A = np.vstack([np.eye(n)[fixed], A])
        b = np.concatenate([np.ones(fixed.sum()), b])
        cones = [clarabel.ZeroConeT(int(fixed.sum()))] + cones
    settings_ = clarabel.DefaultSettings()
    settings_.verbose = False
    settings_.tol_gap_abs = settings_.tol_gap_rel = 1e-10
    solution = clarabel.DefaultSolver(P, q, sp.csc_matrix(A), b, cones, settings_).solve()
    return float(solution.obj_val + w @ gram @ w)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_relaxed_optimum_matches_independent_qp_solver(alpha):
    rng = np.random.default_rng(3)
    weight, gram = correlated_problem(rng, 5, 10)
    k = 4
    sol = fw_jax.solve_layer(weight, gram, k, alpha=alpha, tol=1e-6, options=SolverOptions(max_iter=4000))
    fixed = np.asarray(sol.fixed)
    qp = sum(qp_row_optimum(weight[i], gram, k, fixed[i]) for i in range(5))
    np.testing.assert_allclose(float(sol.relaxed_loss), qp, rtol=1e-3)
    assert float(sol.relaxed_loss) - float(sol.gap) <= qp * (1 + 1e-9)
    if alpha == 0.0:
        assert float(sol.lower_bound) <= qp * (1 + 1e-9)
        np.testing.assert_allclose(float(sol.lower_bound), qp, rtol=1e-3)


def test_same_shapes_do_not_recompile_and_traced_options_do_not_either():
    rng = np.random.default_rng(4)
    weight, gram = correlated_problem(rng, 8, 12)
    fw_jax.solve_layer(weight, gram, 6, options=SolverOptions(max_iter=20))
    before = _solve._cache_size()
    other_weight, other_gram = correlated_problem(rng, 8, 12)
    fw_jax.solve_layer(other_weight, other_gram, 6, options=SolverOptions(max_iter=20))
    fw_jax.solve_layer(weight, gram, 6, alpha=0.7, tol=1e-2, options=SolverOptions(max_iter=20))
    assert _solve._cache_size() == before
    fw_jax.solve_layer(weight, gram, 5, options=SolverOptions(max_iter=20))  # a new budget is a new program
    assert _solve._cache_size() == before + 1


def test_works_under_jit_and_vmap():
    rng = np.random.default_rng(5)
    problems = [correlated_problem(rng, 6, 8) for _ in range(3)]
    weights = jnp.stack([p[0] for p in problems])
    grams = jnp.stack([p[1] for p in problems])
    solve = lambda w, g: fw_jax.solve_layer(w, g, fw_jax.NM(2, 4), options=SolverOptions(max_iter=40))  # noqa: E731
    batched = jax.jit(jax.vmap(solve))(weights, grams)
    for i, (w, g) in enumerate(problems):
        single = solve(w, g)
        np.testing.assert_array_equal(np.asarray(batched.mask[i]), np.asarray(single.mask))
        np.testing.assert_allclose(float(batched.loss[i]), float(single.loss), rtol=1e-10)
        np.testing.assert_allclose(float(batched.lower_bound[i]), float(single.lower_bound), rtol=1e-8)


@pytest.mark.parametrize("budget", [fw_jax.PerRow(6), fw_jax.NM(2, 4)], ids=str)
@pytest.mark.parametrize("warm", ["wanda", "ria", "given"])
def test_rows_in_chunks_give_the_whole_layer_s_solution(budget, warm):
    """Per-row and n:m budgets solved 4 rows at a time (``row_chunk``): the same mask, errors,
    bound and counts as the layer whole, in float64 (RIA's scores need every row: computed whole),
    also under ``jit`` and ``vmap``."""
    rng = np.random.default_rng(11)
    weight, gram = correlated_problem(rng, 12, 16)
    if warm == "given":
        warm = np.asarray(fw_jax.solve_layer(weight, gram, budget, options=SolverOptions(max_iter=0, swaps=False)).mask)
    solve = lambda w, g, chunk: fw_jax.solve_layer(  # noqa: E731
        w, g, budget, warm_start=warm, alpha=0.5, options=SolverOptions(max_iter=30, row_chunk=chunk))
    assert SolverOptions(row_chunk=4).rows_per_chunk(12, 16) == 4
    whole, chunked = solve(weight, gram, None), solve(weight, gram, 4)
    np.testing.assert_array_equal(np.asarray(chunked.mask), np.asarray(whole.mask))
    np.testing.assert_array_equal(np.asarray(chunked.fixed), np.asarray(whole.fixed))
    for field in ("loss", "warm_loss", "lower_bound", "gap", "relaxed_loss", "row_loss", "relaxed_mask"):
        np.testing.assert_allclose(np.asarray(getattr(chunked, field)), np.asarray(getattr(whole, field)),
                                   rtol=1e-9, atol=1e-12, err_msg=field)
    assert int(chunked.swaps) == int(whole.swaps) and int(chunked.iterations) == int(whole.iterations)
    assert chunked.status_name == whole.status_name
    batched = jax.jit(jax.vmap(lambda w, g: solve(w, g, 4)))(jnp.stack([weight, weight]), jnp.stack([gram, gram]))
    np.testing.assert_array_equal(np.asarray(batched.mask[1]), np.asarray(whole.mask))


def test_how_rows_are_chunked():
    """The default chunk is the largest divisor of d_out within 2²² weights, for layers over twice
    that; a layer budget, a history, or no divisor near enough solve the layer whole."""
    auto = SolverOptions()
    assert auto.rows_per_chunk(4096, 11008) == 256 and auto.rows_per_chunk(11008, 4096) == 688
    assert auto.rows_per_chunk(4096, 4096) == 1024 and auto.rows_per_chunk(2048, 2048) == 2048
    assert auto.rows_per_chunk(4099, 4096) == 4099  # prime: a chunk of 1 row is too far from 1024
    assert SolverOptions(history=5).rows_per_chunk(4096, 11008) == 4096
    assert SolverOptions(row_chunk=100).rows_per_chunk(64, 48) == 64
    assert SolverOptions(row_chunk=10).rows_per_chunk(64, 48) == 8
    assert not fw_jax.LayerBudget(4).separable_rows and fw_jax.PerRow(4).separable_rows
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="SolverOptions.row_chunk"):
            SolverOptions(row_chunk=bad)
    weight, gram = correlated_problem(np.random.default_rng(12), 8, 12)
    layer = fw_jax.solve_layer(weight, gram, fw_jax.LayerBudget(40), options=SolverOptions(row_chunk=2))
    assert int(np.asarray(layer.mask).sum()) == 40


def test_float32_bfloat16_and_float64_agree():
    rng = np.random.default_rng(6)
    weight, gram = correlated_problem(rng, 8, 16)
    s64 = fw_jax.solve_layer(weight, gram, 8, options=SolverOptions(max_iter=150))
    s32 = fw_jax.solve_layer(weight.astype(np.float32), gram.astype(np.float32), 8, options=SolverOptions(max_iter=150))
    sbf = fw_jax.solve_layer(jnp.asarray(weight, jnp.bfloat16), jnp.asarray(gram, jnp.bfloat16), 8, options=SolverOptions(max_iter=150))
    assert s64.loss.dtype == jnp.float64 and s32.loss.dtype == jnp.float32 and sbf.loss.dtype == jnp.float32
    np.testing.assert_allclose(float(s32.loss), float(s64.loss), rtol=2e-2)
    assert float(sbf.loss) <= float(sbf.warm_loss) * (1 + 1e-6)


def test_deterministic():
    rng = np.random.default_rng(7)
    weight, gram = correlated_problem(rng, 8, 12)
    weight = np.round(weight)  # many ties
    a = fw_jax.solve_layer(weight, gram, 6, alpha=0.5)
    b = fw_jax.solve_layer(weight.copy(), gram.copy(), 6, alpha=0.5)
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert float(a.loss) == float(b.loss)


@pytest.mark.parametrize("rule", ["open_loop", "exact", "short"])
def test_step_rules_and_history(rule):
    rng = np.random.default_rng(8)
    weight, gram = correlated_problem(rng, 6, 12)
    sol = fw_jax.solve_layer(weight, gram, 6, tol=0.0, options=SolverOptions(step_rule=rule, max_iter=50, history=True))
    relaxed = np.asarray(sol.history.relaxed_loss)
    assert np.all(np.isfinite(relaxed[:50]))
    assert np.all(np.asarray(sol.history.gap)[:50] >= -1e-9)
    assert np.all(np.asarray(sol.history.rounded_loss)[:50] >= relaxed[:50] - 1e-6 * relaxed[0])
    if rule != "open_loop":  # monotone rules
        assert np.all(np.diff(relaxed) <= 1e-9 * relaxed[0])
    assert float(sol.relaxed_loss) < relaxed[0]


def test_a_history_every_n_iterations_rounds_only_there_and_agrees_with_the_full_one():
    weight, gram = correlated_problem(np.random.default_rng(8), 6, 12)
    full = fw_jax.solve_layer(weight, gram, 6, tol=0.0, options=SolverOptions(max_iter=20, history=True))
    every = fw_jax.solve_layer(weight, gram, 6, tol=0.0, options=SolverOptions(max_iter=20, history=3))
    rounded, recorded = np.asarray(every.history.rounded_loss), np.arange(20) % 3 == 0
    assert np.all(np.isfinite(rounded[recorded])) and np.all(np.isnan(rounded[~recorded]))
    np.testing.assert_allclose(rounded[recorded], np.asarray(full.history.rounded_loss)[recorded], rtol=1e-6)
    for key in ("relaxed_loss", "gap"):  # free: always recorded
        np.testing.assert_allclose(np.asarray(getattr(every.history, key)), np.asarray(getattr(full.history, key)),
                                   rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(every.mask), np.asarray(full.mask))
    for bad in (0, -2, 1.5, "3"):
        with pytest.raises(ValueError, match="SolverOptions.history"):
            SolverOptions(history=bad)


def test_pairwise_exact_beats_open_loop_at_equal_iterations():
    """Pairwise steps (``pairwise_frank_wolfe``, on the hypersimplex) against the published
    open-loop vanilla steps, from the same magnitude warm start."""
    from fw_jax.solver import ExactLineSearch, OpenLoop, TopKLMO, frank_wolfe, pairwise_frank_wolfe

    rng = np.random.default_rng(9)
    weight, gram = (jnp.asarray(x) for x in correlated_problem(rng, 8, 16))
    init = jnp.asarray(fw_jax.magnitude_mask(weight, 8), weight.dtype)
    fixed = jnp.zeros(weight.shape, bool)
    common = dict(max_iter=100, tol=jnp.zeros((), weight.dtype), gram_norm=jnp.ones((), weight.dtype))
    exact = pairwise_frank_wolfe(weight, gram, init, fixed, TopKLMO(8, exact=True), ExactLineSearch(), **common)
    opened = frank_wolfe(weight, gram, init, fixed, TopKLMO(8), OpenLoop(), **common)
    assert float(jnp.sum(exact.loss)) < float(jnp.sum(opened.loss))
    assert np.allclose(np.asarray(jnp.sum(exact.relaxed_mask, axis=1)), 8)  # stays on the hypersimplex
    with pytest.raises(ValueError, match="exact"):
        pairwise_frank_wolfe(weight, gram, init, fixed, TopKLMO(8), ExactLineSearch(), **common)


def test_explicit_warm_mask_and_alpha_one_returns_warm_without_swaps():
    rng = np.random.default_rng(10)
    weight, gram = correlated_problem(rng, 6, 8)
    warm = np.asarray(fw_jax.magnitude_mask(weight, 4))
    sol = fw_jax.solve_layer(weight, gram, 4, warm_start=warm, alpha=1.0, options=SolverOptions(swaps=False, max_iter=10))
    np.testing.assert_array_equal(np.asarray(sol.mask), warm)
    sol = fw_jax.solve_layer(weight, gram, 4, warm_start=warm, options=SolverOptions(max_iter=50))
    assert_le(sol.loss, sol.warm_loss, rtol=1e-12)  # a swap's predicted gain vs recomputed errors


def test_certificate_and_status():
    rng = np.random.default_rng(11)
    weight, gram = correlated_problem(rng, 4, 8)
    sol = fw_jax.solve_layer(weight, gram, 4, tol=0.0, options=SolverOptions(max_iter=3))
    assert sol.status_name == "max_iterations"
    assert 0.0 <= float(sol.certificate) <= 1.0  # (loss - bound) / loss with 0 ≤ bound ≤ loss, by construction
    sol = fw_jax.solve_layer(weight, gram, 4, tol=1e-2, options=SolverOptions(max_iter=3000))
    assert sol.status_name == "converged"


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e25), (np.float64, 1e160)])
def test_overflow_outside_jit_gives_no_certificate(dtype, scale):
    """Finite inputs that overflow in the error are not refused but give status nonfinite, and
    no certificate, outside jit as within."""
    rng = np.random.default_rng(14)
    weight, gram = correlated_problem(rng, 4, 8, dtype=dtype)
    for solve in (fw_jax.solve_layer, jax.jit(fw_jax.solve_layer, static_argnums=2)):
        sol = solve((weight * scale).astype(dtype), gram, 4)
        assert sol.status_name == "nonfinite"
        assert np.isnan(float(sol.gap)) and np.isnan(float(sol.certificate)) and float(sol.lower_bound) == -np.inf
    sol = fw_jax.solve_layer(weight, gram, 4)  # the same problem unscaled proves a bound
    assert sol.status_name in ("converged", "max_iterations") and 0 <= float(sol.certificate) <= 1


def test_bad_input_raises_clear_errors():
    rng = np.random.default_rng(12)
    weight, gram = correlated_problem(rng, 4, 8)
    cases = [
        (dict(weight=np.where(np.eye(4, 8) > 0, np.nan, weight)), "weight contains non-finite"),
        (dict(gram=np.where(np.eye(8) > 0, np.inf, gram)), "gram contains non-finite"),
        (dict(gram=gram[:, :7]), "square"),
        (dict(gram=gram[:6, :6]), "gram is"),
        (dict(gram=gram + np.triu(np.ones((8, 8))) * gram.max()), "not symmetric"),
        (dict(budget=0), "outside 1..d_in"),
        (dict(budget=9), "outside 1..d_in"),
        (dict(budget=fw_jax.NM(3, 2)), "n > m"),
        (dict(budget=fw_jax.NM(2, 3)), "does not divide"),
        (dict(budget=fw_jax.LayerBudget(33)), "outside 1..d_out"),
        (dict(budget=2.5), "budget must be"),
        (dict(weight=np.ones((4, 8), np.int32)), "floating dtype"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(warm_start=np.ones((4, 8), bool)), "breaks the budget"),
        (dict(warm_start=np.ones((4, 7), bool)), "shape"),
        (dict(warm_start="bogus"), "saliency must be"),
        (dict(weight=weight[0]), "2-D"),
    ]
    for change, message in cases:
        args = dict(weight=weight, gram=gram, budget=4)
        args.update(change)
        kwargs = {k: args.pop(k) for k in ("alpha", "warm_start") if k in args}
        with pytest.raises(ValueError, match=message):
            fw_jax.solve_layer(args["weight"], args["gram"], args["budget"], **kwargs)


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("units", ["rows", "layer"])
def test_threshold_hints_do_not_change_the_iterates(pairwise, units):
    """The Frank-Wolfe loop with the oracle's thresholds carried between iterations
    (``TopKLMO(hint=True)``, the default) takes exactly the steps of cold searches."""
    from fw_jax.solver import TopKLMO, frank_wolfe, pairwise_frank_wolfe
    from fw_jax.solver._steps import ExactLineSearch

    rng = np.random.default_rng(12)
    weight, gram = correlated_problem(rng, 10, 16, dtype=np.float32)
    weight, gram = jnp.asarray(weight), jnp.asarray(gram)
    k = 8 if units == "rows" else 80
    if units == "layer":
        weight = weight[None]
    init = jnp.asarray(np.argsort(np.argsort(-np.abs(np.asarray(weight)).reshape(weight.shape[0], -1), 1), 1)
                       .reshape(weight.shape) < k, jnp.float32)
    fixed = jnp.zeros(weight.shape, bool)
    results = []
    for hint in (True, False):
        lmo = TopKLMO(k, "search", exact=pairwise, hint=hint)
        loop = pairwise_frank_wolfe if pairwise else frank_wolfe
        run = jax.jit(lambda w, g, m, f, lmo=lmo, loop=loop: loop(
            w, g, m, f, lmo, ExactLineSearch(), max_iter=60, tol=jnp.zeros((), jnp.float32),
            gram_norm=jnp.ones((), jnp.float32)))
        results.append(run(weight, gram, init, fixed))
    hinted, cold = results
    np.testing.assert_array_equal(np.asarray(hinted.relaxed_mask), np.asarray(cold.relaxed_mask))
    np.testing.assert_array_equal(np.asarray(hinted.lower_bound), np.asarray(cold.lower_bound))
    np.testing.assert_array_equal(np.asarray(hinted.iterations), np.asarray(cold.iterations))
