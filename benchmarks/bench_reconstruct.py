"""Time and accuracy of the weight-reconstruction solvers on SmolLM2-135M-like layer shapes.

For each shape (d_out, d_in) and mask (50% Wanda-style per row, 2:4 Wanda-style), runs every
solver configuration in float32, after a warm-up, and reports:

* compile time (ahead-of-time ``lower().compile()``), and the median wall time of the compiled
  call over ``--repeats`` runs after a warm-up (``block_until_ready``; input validation excluded);
* iterations taken;
* ``excess``: relative excess of the damped objective ``Σ_i (w−ŵ)H(w−ŵ)ᵀ`` over its optimum,
  the optimum being a float64 per-row numpy solve of ``H_SS ŵ_S = (H w)_S``;
* ``kept error``: undamped layer error after reconstruction / before (``mask ⊙ W``);
* speed ratio against textbook (unpreconditioned) CG measured in the same run.

The ``direct`` solver (per-row LAPACK Cholesky) is run only up to ``--direct-max-d-in`` (600):
on 576×1536 it takes minutes here.

The Gram is ``X Xᵀ`` of synthetic correlated activations: a rank-``--rank`` signal plus noise,
uneven channel scales and a few outlier channels, as in real LLM inputs.

Run: ``python benchmarks/bench_reconstruct.py`` (writes results/reconstruct.md). An earlier run
also tried ADMM with rho = 0.1 · mean(diag H): 1.3–2.9× the iterations of rho = 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # for the float64 reference only; solvers run in float32

from fw_jax.solver._objective import layer_error, weights_error  # noqa: E402
from fw_jax.solver._reconstruct import _prepare_call, _reconstruct_jit, reconstruct  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536)]
CONFIGS = {  # name: reconstruct() keyword arguments
    "cg jacobi tol=1e-3": dict(method="cg", tol=1e-3, max_iter=1000),
    "cg jacobi tol=1e-4": dict(method="cg", tol=1e-4, max_iter=1000),
    "cg jacobi tol=1e-5": dict(method="cg", tol=1e-5, max_iter=1000),
    "cg plain tol=1e-4": dict(method="cg", tol=1e-4, max_iter=1000, jacobi=False),
    "admm rho=1 tol=1e-4": dict(method="admm", tol=1e-4, max_iter=1000, rho=1.0),
    "direct": dict(method="direct"),
}
BASELINE = "cg plain tol=1e-4"  # textbook CG: the ratio column is time / this, same run


def synthetic_layer(d_out, d_in, *, rank, tokens, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((d_in, rank)) @ rng.standard_normal((rank, tokens)) / np.sqrt(rank)
    x += 0.5 * rng.standard_normal((d_in, tokens))
    x *= np.exp(0.5 * rng.standard_normal((d_in, 1)))
    x[rng.choice(d_in, 4, replace=False)] *= 10.0  # outlier channels
    weight = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    return weight, x @ x.T


def wanda_masks(weight, gram):
    score = np.abs(weight) * np.sqrt(np.diag(gram))[None, :]
    d_out, d_in = weight.shape
    rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)
    half = rank < d_in // 2
    groups = score.reshape(d_out, d_in // 4, 4)
    two_four = (np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1) < 2).reshape(d_out, d_in)
    return {"50%": half, "2:4": two_four}


def optimum_float64(weight, gram, mask, damp):
    """The exact reconstruction in float64: CG to a 1e-12 residual reduction.

    (tests/test_reconstruct.py checks this solver against numpy.linalg.solve row by row; a
    per-row LAPACK solve in float64 takes minutes on these shapes here.)
    """
    optimum, iterations = reconstruct(weight, gram, mask, damp=damp, method="cg", tol=1e-12, max_iter=20000,
                                      return_iterations=True)
    assert int(iterations) < 20000, "float64 reference did not converge"
    d_in = gram.shape[0]
    return np.asarray(optimum), gram + damp * np.mean(np.diag(gram)) * np.eye(d_in)


def damped_objective(weight, hessian, new_weight):
    diff = weight - new_weight
    return float(np.sum((diff @ hessian) * diff))


def measure(weight32, gram32, mask, options, repeats, slow_s=5.0):
    """Ahead-of-time compile, one warm-up run, then the median of ``repeats`` runs (1 if slow)."""
    args, statics = _prepare_call(weight32, gram32, mask, options["damp"], options["method"],
                                  options.get("max_iter"), options.get("tol"),
                                  options.get("jacobi", True), options.get("rho", 1.0))
    start = time.perf_counter()
    compiled = _reconstruct_jit.lower(*args, **statics).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(repeats if warm_up < slow_s else 1):
        start = time.perf_counter()
        new_weight, iterations = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return np.asarray(new_weight, np.float64), int(iterations), compile_s, float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--direct-max-d-in", type=int, default=600,
                        help="skip the (slow, LAPACK-bound) direct solver above this d_in")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--shapes", nargs="*", default=[f"{a}x{b}" for a, b in SHAPES])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "results", "reconstruct.md"))
    args = parser.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:]))

    rows = []
    t_begin = time.perf_counter()
    for shape in args.shapes:
        d_out, d_in = map(int, shape.split("x"))
        weight, gram = synthetic_layer(d_out, d_in, rank=args.rank, tokens=args.tokens, seed=d_out + d_in)
        weight32, gram32 = jnp.asarray(weight, jnp.float32), jnp.asarray(gram, jnp.float32)
        for mask_name, mask in wanda_masks(weight, gram).items():
            optimum, hessian = optimum_float64(weight, gram, mask, args.damp)
            best = damped_objective(weight, hessian, optimum)
            before = float(layer_error(weight, gram, mask))
            case = []
            for name in args.configs:
                if name == "direct" and d_in > args.direct_max_d_in:
                    continue
                options = dict(CONFIGS[name], damp=args.damp)
                new_weight, iterations, compile_s, median_s = measure(weight32, gram32, mask, options, args.repeats)
                excess = (damped_objective(weight, hessian, new_weight) - best) / best
                kept = float(weights_error(weight, gram, new_weight)) / before
                case.append([f"{d_out}x{d_in}", mask_name, name, compile_s, median_s, float("nan"), iterations, excess, kept])
                print(
                    f"{d_out}x{d_in:<5} {mask_name:>4} {name:<22} compile {compile_s:5.2f} s  median {median_s * 1e3:8.1f} ms"
                    f"  iters {iterations:4d}  excess {excess:8.1e}  after/before {kept:.4f}",
                    flush=True,
                )
            base = {r[2]: r[4] for r in case}.get(BASELINE)
            for row in case:
                row[5] = row[4] / base if base else float("nan")
                print(f"    {row[2]:<22} time / {BASELINE}: {row[5]:.2f}")
            rows.extend(case)
    total = time.perf_counter() - t_begin

    lines = [
        "# Weight reconstruction: solver time and accuracy",
        "",
        f"Command: `{command}` (total {total:.0f} s)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, jax {jax.__version__}, "
        f"backend {jax.default_backend()}. Solvers in float32; damp = {args.damp}; synthetic Gram from "
        f"{args.tokens} tokens of rank-{args.rank} signal + noise with uneven channel scales and outliers; "
        "Wanda-style masks. Median of "
        f"{args.repeats} runs after a warm-up call (a single run when the warm-up took over 5 s); compile = "
        "ahead-of-time `lower().compile()` of the jitted call (≈0 when an executable with the same static "
        "arguments was already built: tol, max_iter, damp and rho are traced).",
        "",
        "`excess` = relative excess of the damped objective over the float64 optimum; "
        "`after/before` = undamped layer error after reconstruction / with the mask alone.",
        "",
        f"| shape (d_out×d_in) | mask | solver | compile s | median ms | time / {BASELINE} | iterations | excess | after/before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, mask_name, name, compile_s, median_s, ratio, iterations, excess, kept in rows:
        lines.append(
            f"| {shape} | {mask_name} | {name} | {compile_s:.2f} | {median_s * 1e3:.1f} | {ratio:.2f} | "
            f"{iterations} | {excess:.1e} | {kept:.4f} |"
        )
    lines += ["", "Fastest solver whose excess is ≤ 1e-5, per case:", ""]
    for shape, mask_name in dict.fromkeys((r[0], r[1]) for r in rows):
        case = [r for r in rows if tuple(r[:2]) == (shape, mask_name)]
        good = [r for r in case if r[7] <= 1e-5]
        if good:
            best = min(good, key=lambda r: r[4])
            lines.append(f"- {shape} {mask_name}: {best[2]} ({best[4] * 1e3:.0f} ms, {best[5]:.2f}× {BASELINE}'s time)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.relpath(args.output)}")


if __name__ == "__main__":
    main()
