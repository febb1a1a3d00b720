"""Compile-time variants of the Frank-Wolfe iteration, timed and compared (issue 6).

Every combination of step rule × LMO × product precision is its own compiled solver (fields of
``SolverOptions``, which are static). For each layer shape and each variant:

- compile time (first call minus a warm call),
- time per iteration: median over ``--repeats`` warm runs of (t(T2) − t(T1)) / (T2 − T1), with
  swaps off, so the fixed parts (warm start, rounding, bound) cancel,
- iterations to reach a target relaxed error: the one the first variant of the grid (exact line
  search, bisection, full precision) reaches after a third of the iteration cap; also the
  relative Frank-Wolfe gap at the cap, and the final mask error relative to Wanda's,
- ratios: against the published
  recipe implemented plainly in the same JAX (``sparsefw_published``: dense GEMM, ``lax.top_k``,
  ``2/(t+2)``) timed in the same run the same way,
- the measured dense GEMM rate on this device and the FLOP rate the iteration achieves (one
  (d_out×d_in)·(d_in×d_in) GEMM counted per iteration).

Shapes: real SmolLM2-135M layers (block 14, Austen calibration, ``benchmarks/real_layers.py``)
and LLaMA-7B shapes (4096×4096, 11008×4096, 4096×11008) with synthetic PSD Gram matrices
(a diagonal of uneven channel energies plus a rank-256 correlated part). On a CPU the LLaMA
shapes keep only ``--rows`` output rows (rows are independent, so time scales with rows).

    python benchmarks/bench_variants.py                    # CPU run → results/variants.md/.json/.png
    python benchmarks/bench_variants.py --preset gpu       # the GPU check: full LLaMA-7B shapes
    python benchmarks/bench_variants.py --preset tiny      # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fw_jax  # noqa: E402
from fw_jax.solver import sparsefw_published  # noqa: E402

LLAMA_SHAPES = {"llama7b.attn (4096×4096)": (4096, 4096), "llama7b.up (11008×4096)": (11008, 4096),
                "llama7b.down (4096×11008)": (4096, 11008)}
SMOLLM_LAYERS = ("self_attn.q_proj", "mlp.down_proj")
PRESETS = {
    # shapes, LLaMA rows kept, T1, T2, repeats, max_iter for the gap run, precisions
    # On 2 CPU cores the full grid runs on the first layer only; the others get a reduced grid.
    "cpu": dict(smollm=True, llama_rows=64, t1=5, t2=25, repeats=3, max_iter=150, llama_max_iter=40,
                precisions=("default", "bfloat16"), reduced=dict(step=("exact",), lmo=("bisect", "search"))),
    "gpu": dict(smollm=True, llama_rows=None, t1=10, t2=40, repeats=5, max_iter=300, llama_max_iter=300,
                precisions=("highest", "default", "bfloat16")),
    "tiny": dict(smollm=False, llama_rows=None, t1=2, t2=5, repeats=2, max_iter=20, llama_max_iter=20,
                 precisions=("default", "bfloat16"), tiny=True),
}


def synthetic_layer(rows, d_in, seed=0, rank=256):
    """Weights and a PSD Gram matrix ``diag(e) + U Uᵀ`` shaped like an LLM layer's inputs."""
    rng = np.random.default_rng(seed)
    energy = rng.lognormal(0.0, 1.0, size=d_in).astype(np.float32)
    energy[rng.choice(d_in, size=max(1, d_in // 100), replace=False)] *= 30  # outlier channels
    u = jnp.asarray(rng.normal(size=(d_in, min(rank, d_in))).astype(np.float32)) * jnp.sqrt(jnp.asarray(energy))[:, None]
    gram = jnp.diag(jnp.asarray(energy) * d_in) + u @ u.T
    weight = jnp.asarray(rng.normal(size=(rows, d_in)).astype(np.float32) / np.sqrt(d_in))
    return weight, jax.block_until_ready(gram)


def problems(preset, rows_override=None, only=None):
    cfg = PRESETS[preset]
    out = []
    if cfg.get("tiny"):
        return [("tiny (48×64)", *synthetic_layer(48, 64, rank=16))]
    if cfg["smollm"] and only in (None, "smollm2"):
        from real_layers import load_layers

        for name, w, g in load_layers(blocks=(14,)):
            if name.endswith(SMOLLM_LAYERS):
                out.append((f"smollm2 {name.split('.', 2)[-1]} ({w.shape[0]}×{w.shape[1]})", jnp.asarray(w), jnp.asarray(g)))
    rows = rows_override or cfg["llama_rows"]
    for name, (d_out, d_in) in LLAMA_SHAPES.items() if only in (None, "llama7b") else ():
        kept = min(d_out, rows) if rows else d_out
        label = name if kept == d_out else f"{name}, {kept} rows"
        out.append((label, *synthetic_layer(kept, d_in)))
    return out


def run(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def per_iteration(make, t1, t2, repeats):
    """(compile s, median s per iteration): ``make(T)`` returns a thunk running T iterations."""
    fns = {t: make(t) for t in (t1, t2)}
    first = {t: run(f) for t, f in fns.items()}
    warm = {t: [run(fns[t]) for _ in range(repeats)] for t in (t1, t2)}
    compile_s = statistics.median(first[t2] - w for w in warm[t2])
    per_iter = statistics.median((b - a) / (t2 - t1) for a, b in zip(warm[t1], warm[t2]))
    if per_iter <= 0:  # below the timer's noise (tiny problems): the whole run's average, an upper bound
        per_iter = statistics.median(warm[t2]) / t2
    return max(compile_s, 0.0), per_iter


def gemm_rate(weight, gram, repeats):
    """Measured TFLOP/s of the dense (d_out×d_in)·(d_in×d_in) product on this device."""
    f = jax.jit(lambda w, g: w @ g)
    run(lambda: f(weight, gram))
    seconds = statistics.median(run(lambda: f(weight, gram)) for _ in range(max(3, repeats)))
    return 2 * weight.shape[0] * weight.shape[1] ** 2 / seconds / 1e12, seconds


VARIANT_KEYS = ("step", "lmo", "precision")


GRID = dict(step=("exact", "open_loop"), lmo=("bisect", "search", "top_k"))


def variants(grid):
    for values in itertools.product(*(grid[k] for k in VARIANT_KEYS)):
        yield dict(zip(VARIANT_KEYS, values))


def solve_options(v, **more):
    return fw_jax.SolverOptions(step_rule=v["step"], lmo_method=v["lmo"], precision=v["precision"], **more)


def measure(preset, rows_override=None, grid=None, log=print, on_layer=None, only=None, previous=()):
    cfg = PRESETS[preset]
    user_grid = grid
    grid = {**GRID, "precision": cfg["precisions"], **(grid or {})}
    rows = list(previous)
    for name, weight, gram in problems(preset, rows_override, only):
        llama = name.startswith("llama")
        max_iter = cfg["llama_max_iter"] if llama else cfg["max_iter"]
        reduced = {k: v for k, v in cfg.get("reduced", {}).items() if k not in (user_grid or {})}
        layer_grid = dict(grid, **reduced) if (rows or only == "llama7b") and reduced else grid
        k = weight.shape[1] // 2
        wanda = float(fw_jax.layer_error(weight, gram, fw_jax.wanda_mask(weight, gram, k)))
        tflops, gemm_s = gemm_rate(weight, gram, cfg["repeats"])
        flop = 2 * weight.shape[0] * weight.shape[1] ** 2
        published_compile, published_iter = per_iteration(
            lambda t: (lambda: sparsefw_published(weight, gram, k, iterations=t).mask), cfg["t1"], cfg["t2"], cfg["repeats"])
        log(f"{name}: GEMM {gemm_s * 1e3:.1f} ms ({tflops:.3f} TFLOP/s), published {published_iter * 1e3:.1f} ms/iter")
        target = None  # relaxed error to reach: the first variant's after max_iter // 3 iterations
        for v in variants(layer_grid):
            compile_s, per_iter = per_iteration(
                lambda t: (lambda: fw_jax.solve_layer(weight, gram, k, tol=0.0, options=solve_options(v, max_iter=t, swaps=False)).mask),
                cfg["t1"], cfg["t2"], cfg["repeats"])
            sol = fw_jax.solve_layer(weight, gram, k, tol=0.0, options=solve_options(v, max_iter=max_iter, history=True))
            relaxed = np.asarray(sol.history.relaxed_loss)
            if target is None:
                target = relaxed[max_iter // 3 - 1]
            reached = np.flatnonzero(relaxed <= target * (1 + 1e-6))
            iters = int(reached[0]) + 1 if reached.size else max_iter
            row = dict(
                layer=name, shape=list(weight.shape), **v, compile_s=compile_s, ms_per_iter=per_iter * 1e3,
                gemm_ms=gemm_s * 1e3, gemm_tflops=tflops, achieved_tflops=flop / per_iter / 1e12,
                published_ms_per_iter=published_iter * 1e3, published_compile_s=published_compile,
                iters_to_target=iters, reached_target=bool(reached.size),
                final_gap=float(np.asarray(sol.history.gap)[-1] / relaxed[-1]),
                error_vs_wanda=float(sol.loss) / wanda, relaxed_vs_wanda=float(sol.relaxed_loss) / wanda,
            )
            rows.append(row)
            jax.clear_caches()  # dozens of compiled solvers otherwise exhaust the JIT's code memory
            log(f"  {v['step']:9s} {v['lmo']:6s} {v['precision']:8s} {per_iter * 1e3:8.2f} ms/iter  "
                f"compile {compile_s:5.1f} s  {iters:4d} it to target  gap {row['final_gap']:.3f}  error {row['error_vs_wanda']:.4f}")
        add_ratios(rows, grid["precision"][0])
        if on_layer is not None:  # results so far, so an interrupted run keeps them
            on_layer(rows)
    return rows


def add_ratios(rows, full_precision):
    for row in rows:  # ratios inside the same layer
        def twin(key, value):  # the same variant but for one choice
            return next((r for r in rows if r["layer"] == row["layer"] and r[key] == value
                         and all(r[k] == row[k] for k in VARIANT_KEYS if k != key)), None)

        full = twin("precision", full_precision)
        row["vs_published"] = row["ms_per_iter"] / row["published_ms_per_iter"]
        row["error_vs_full_precision"] = row["error_vs_wanda"] / full["error_vs_wanda"] - 1 if full else float("nan")


def markdown(rows, meta):
    lines = [
        "# Frank-Wolfe iteration variants",
        "",
        f"Command: `{meta['command']}` — {meta['minutes']:.0f} min on {meta['machine']}, jax {jax.__version__}"
        f"{'' if meta['complete'] else ' (partial: the run was still going or was interrupted)'}"
        f"{'; rows kept from ' + ', '.join(f'`{c}`' for c in meta['earlier']) if meta.get('earlier') else ''}. "
        "'its to target': iterations until the relaxed error is at most the first variant's after a third of "
        f"the cap ({meta['max_iter']} iterations; LLaMA shapes {meta['llama_max_iter']}); 'gap': relative Frank-Wolfe "
        "gap at the cap. Times are medians of "
        f"{meta['repeats']} warm runs; 'per iter' = (t({meta['t2']} it) − t({meta['t1']} it)) / {meta['t2'] - meta['t1']}. "
        "'vs published': over the plain published recipe (dense GEMM, `lax.top_k`, 2/(t+2)) timed "
        "the same way in the same run. 'TFLOP/s' counts one dense GEMM per iteration; 'GEMM' is the measured "
        "rate of that product alone. 'err Δ' is the final mask error against the first precision's.",
        "",
    ]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        group = [r for r in rows if r["layer"] == layer]
        g = group[0]
        lines += [
            f"## {layer}",
            "",
            f"GEMM {g['gemm_ms']:.2f} ms ({g['gemm_tflops']:.3f} TFLOP/s); published recipe {g['published_ms_per_iter']:.2f} ms/iter "
            f"(compile {g['published_compile_s']:.1f} s).",
            "",
            "| step | LMO | precision | compile s | ms/iter | vs published | TFLOP/s | its to target | gap | error vs Wanda | err Δ |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(group, key=lambda r: r["ms_per_iter"]):
            lines.append(
                f"| {r['step']} | {r['lmo']} | {r['precision']} | {r['compile_s']:.1f} | {r['ms_per_iter']:.2f} | "
                f"**{r['vs_published']:.2f}** | {r['achieved_tflops']:.3f} | "
                f"{r['iters_to_target']}{'' if r['reached_target'] else '+'} | {r['final_gap']:.3f} | "
                f"{r['error_vs_wanda']:.4f} | "
                f"{100 * r['error_vs_full_precision']:+.2f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    names = list(dict.fromkeys(f"{r['step']}/{r['lmo']}/{r['precision']}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(layers)) + 4, 5))
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        values = [next((r["vs_published"] for r in rows if r["layer"] == layer
                        and f"{r['step']}/{r['lmo']}/{r['precision']}" == name), np.nan) for layer in layers]
        ax.bar(np.arange(len(layers)) + i * width, values, width, label=name, color=colors(i % colors.N),
               hatch="//" if i >= colors.N else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [layer.replace(" (", "\n(") for layer in layers], fontsize=7)
    ax.set_ylabel("time per iteration / published recipe's")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="step/LMO/precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="output rows kept of the LLaMA shapes")
    parser.add_argument("--out", default=str(ROOT / "results" / "variants"))
    parser.add_argument("--only", choices=("smollm2", "llama7b"), default=None, help="one family of shapes")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out's JSON")
    for key in VARIANT_KEYS:
        parser.add_argument(f"--{key}", nargs="+", default=None, help=f"restrict the grid's {key} choices")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    grid = {k: tuple(getattr(args, k)) for k in VARIANT_KEYS if getattr(args, k)}
    cfg = PRESETS[args.preset]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    earlier = []  # the runs whose rows are kept (--append)
    if args.append:
        old = json.loads(out.with_suffix(".json").read_text())["meta"]
        earlier = old.get("earlier", []) + [f"{old['command']} ({old['minutes']:.0f} min)"]

    def write(rows, final=False):
        meta = dict(command="python benchmarks/bench_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    earlier=earlier,
                    minutes=(time.perf_counter() - started) / 60, complete=final,
                    machine=f"{platform.machine()}, {jax.devices()[0].device_kind} ({jax.default_backend()})", **cfg)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows, meta))
        plot(rows, out.with_suffix(".png"))

    previous = json.loads(out.with_suffix(".json").read_text())["rows"] if args.append else []
    rows = measure(args.preset, args.rows, grid, log=lambda s: print(s, flush=True), on_layer=write,
                   only=args.only, previous=previous)
    write(rows, final=True)
    print(out.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
