"""Warm-started threshold searches in the Frank-Wolfe loops, timed against cold searches.

The threshold oracles (``TopKLMO`` with ``method="bisect"``/``"search"``) find each row's
k-th smallest gradient entry by counting passes. Inside Frank-Wolfe the gradient changes a
little per iteration, so each search can start from the previous iteration's threshold
(``TopKLMO(hint=True)``, the default). This script measures what that buys on real SmolLM2-135M
layers (block 14, Austen calibration, ``benchmarks/real_layers.py``) at 50% per-row sparsity:

- ``solve_layer`` with its defaults, and ``sparsefw_published`` (``lmo_method="search"``, as the
  pipeline runs it) for ``--iterations`` iterations;
- each with the hint on and off, alternated within one process: wall time median of
  ``--repeats`` warm calls (compile excluded; measured once separately), the ratio cold/hinted,
  and a check that both give the same mask.

    python benchmarks/bench_lmo_hint.py            # → results/lmo_hint.md / .json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fw_jax  # noqa: E402
from fw_jax.pipeline import atomic_write  # noqa: E402
from fw_jax.solver import _budgets  # noqa: E402
from fw_jax.solver import TopKLMO  # noqa: E402
from real_layers import load_layers  # noqa: E402

LAYERS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


class _Cold:
    """Within the block, every TopKLMO the solvers build has ``hint=False``."""

    def __enter__(self):
        self.saved = _budgets.TopKLMO
        _budgets.TopKLMO = lambda *a, **kw: TopKLMO(*a, **{**kw, "hint": False})  # every budget's oracle
        jax.clear_caches()

    def __exit__(self, *exc):
        _budgets.TopKLMO = self.saved
        jax.clear_caches()


class _Hinted:
    def __enter__(self):
        jax.clear_caches()

    def __exit__(self, *exc):
        pass


def timed(fn, repeats):
    start = time.perf_counter()
    first = jax.block_until_ready(fn())
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return first, median, first_s - median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300, help="sparsefw_published iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "lmo_hint"))
    parser.add_argument("--tiny", action="store_true", help="one small synthetic layer (what the tests run)")
    args = parser.parse_args(argv)
    if args.tiny:
        from bench_variants import synthetic_layer

        named = [("synthetic 48×64", synthetic_layer(48, 64, rank=16))]
    else:
        layers = {name: (w, g) for name, w, g in load_layers(blocks=(14,))}
        named = [(f"model.layers.14.{s}", layers[f"model.layers.14.{s}"]) for s in LAYERS]
    rows = []
    for name, layer in named:
        weight, gram = (jnp.asarray(x) for x in layer)
        k = weight.shape[1] // 2
        solvers = {
            "solve_layer (defaults)": lambda: fw_jax.solve_layer(weight, gram, k).mask,
            f"sparsefw_published ({args.iterations} it)": lambda: fw_jax.solver.sparsefw_published(
                weight, gram, k, iterations=args.iterations, lmo_method="search").mask,
        }
        for label, fn in solvers.items():
            result = {}
            for mode, context in (("cold", _Cold), ("hinted", _Hinted)):
                with context():
                    mask, median, compile_s = timed(fn, args.repeats)
                result[mode] = dict(median_s=median, compile_s=compile_s, mask=np.asarray(mask))
                print(f"{name:32s} {label:28s} {mode:6s} {median:7.3f} s  (compile {compile_s:.1f} s)", flush=True)
            rows.append(dict(
                layer=name, shape=list(weight.shape), solver=label,
                cold_s=result["cold"]["median_s"], hinted_s=result["hinted"]["median_s"],
                speedup=result["cold"]["median_s"] / result["hinted"]["median_s"],
                cold_compile_s=result["cold"]["compile_s"], hinted_compile_s=result["hinted"]["compile_s"],
                same_mask=bool(np.array_equal(result["cold"]["mask"], result["hinted"]["mask"])),
            ))
    command = shlex.join(["python", "benchmarks/bench_lmo_hint.py", *(argv if argv is not None else sys.argv[1:])])
    meta = dict(command=command, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                machine=platform.platform(), repeats=args.repeats, date=time.strftime("%Y-%m-%d"))
    out = pathlib.Path(args.out)
    atomic_write(out.with_suffix(".json"), json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        "# Warm-started threshold searches (TopKLMO hint) vs cold searches",
        "",
        f"`{command}` on {meta['device']} ({meta['cpu_count']} cores), {meta['date']}. "
        f"Median of {args.repeats} warm calls each, cold and hinted alternated in one process; compile time excluded. "
        + ("A small synthetic layer (`--tiny`)." if args.tiny else "SmolLM2-135M block 14, Austen calibration, 50% per row."),
        "",
        "| layer | shape | solver | cold s | hinted s | cold / hinted | same mask |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layer'].split('.', 3)[-1]} | {r['shape'][0]}×{r['shape'][1]} | {r['solver']} | "
                     f"{r['cold_s']:.3f} | {r['hinted_s']:.3f} | {r['speedup']:.2f}× | {'yes' if r['same_mask'] else '**no**'} |")
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
