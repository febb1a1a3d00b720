"""What ``--certify N`` costs and proves, on real SmolLM2-135M layers.

The pipeline's default mask (α = 0.9, Gram shrunk halfway to its diagonal) comes with a weak
lower bound on the layer's best error on ``G`` (certificate often 1: no information), because the
solve ran on another objective with 90% of each budget fixed. ``--certify N``
(:func:`fw_jax.pipeline.prune.certify_mask`) runs N plain Frank-Wolfe iterations on ``G`` from the
chosen mask, only for the bound. For every linear layer of one block, this measures the default
mask solve and the certifying solve for several N, in the same run (compile time apart, then
the median of ``--repeats`` runs), and the certificate ``(error − bound) / error`` each N reaches.

    python benchmarks/bench_certify.py          # writes results/certify.md and .json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fw_jax  # noqa: E402
from bench_solver import timed  # noqa: E402
from fw_jax.pipeline import PruneSettings  # noqa: E402
from fw_jax.pipeline.methods.sparsefw import certify_mask  # noqa: E402
from fw_jax.solver import layer_error  # noqa: E402
from real_layers import load_layers  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern=(2, 4))}


def row(name, weight, gram, setting, iterations, repeats):
    settings = PruneSettings(**SETTINGS[setting])
    method = settings.method
    weight, gram = jnp.asarray(weight), jnp.asarray(gram)
    budget = settings.budget(weight.shape[1])
    shrunk = settings.fitted_gram(gram)

    def solve():
        return fw_jax.solve_layer(weight, shrunk, budget, warm_start=method.warm_start, alpha=method.alpha,
                                  tol=method.tol, options=method.options)

    first, median, sol = timed(solve, repeats)
    error = float(layer_error(weight, gram, sol.mask))
    own = float(fw_jax.mask_lower_bound(weight, gram, budget, sol.relaxed_mask, sol.mask))
    out = {"layer": name, "shape": list(weight.shape), "setting": setting, "solve_s": median,
           "solve_compile_s": first - median, "error": error, "certificate": {0: 1 - max(own, 0.0) / error},
           "certify_s": {}, "certify_compile_s": {}}
    for n in iterations:
        first, median, bound = timed(lambda n=n: certify_mask(weight, gram, budget, sol.mask, n), repeats)
        out["certificate"][n] = 1 - max(own, bound, 0.0) / error
        out["certify_s"][n], out["certify_compile_s"][n] = median, first - median
    return out


def markdown(rows, iterations, command, elapsed, note=""):
    lines = [
        "# `--certify N`: cost and certificate on real SmolLM2-135M layers",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {len(jax.devices())} {jax.devices()[0].platform} device(s), "
        f"jax {jax.__version__}; total {elapsed / 60:.1f} min. Calibration: 32×512 Austen tokens "
        "(`benchmarks/real_layers.py`)." + (f" {note}" if note else ""),
        "",
        "Pipeline defaults (α = 0.9, ρ = 0.5, 100 iterations, swaps). *solve s*: the default mask "
        "solve; *+N*: the certifying solve's time as a fraction of it, and the certificate "
        "`(error − bound) / error` on G (1.00: the bound proves nothing; 0: the mask is optimal). "
        "N = 0 is the bound the default run reports. Times are medians after a compiling call "
        "(compile time not included); both are measured in the same run.",
        "",
        "| layer | shape | setting | solve s | cert N=0 | "
        + " | ".join(f"+{n} its: time, cert" for n in iterations) + " |",
        "|---|---|---|---|---|" + "---|" * len(iterations),
    ]
    for r in rows:
        cells = [f"{r['certify_s'][n] / r['solve_s']:.0%}, {r['certificate'][n]:.2f}" for n in iterations]
        lines.append(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['setting']} | {r['solve_s']:.2f} | "
                     f"{r['certificate'][0]:.2f} | " + " | ".join(cells) + " |")
    for setting in SETTINGS:
        rs = [r for r in rows if r["setting"] == setting]
        if not rs:
            continue
        total = sum(r["solve_s"] for r in rs)
        cells = [f"{sum(r['certify_s'][n] for r in rs) / total:.0%}, "
                 f"{sum(r['certificate'][n] for r in rs) / len(rs):.2f}" for n in iterations]
        lines.append(f"| **block total / mean** | | {setting} | {total:.2f} | "
                     f"{sum(r['certificate'][0] for r in rs) / len(rs):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=14)
    parser.add_argument("--iterations", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default=str(ROOT / "results" / "certify"))
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what else ran)")
    args = parser.parse_args()
    command = "python benchmarks/bench_certify.py " + " ".join(a for a in sys.argv[1:] if a not in ("--note", args.note))
    started = time.perf_counter()
    rows = []
    for setting in args.settings:
        for name, weight, gram in load_layers((args.block,)):
            rows.append(row(name, weight, gram, setting, args.iterations, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    elapsed = time.perf_counter() - started
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    text = markdown(rows, args.iterations, command, elapsed, args.note)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
