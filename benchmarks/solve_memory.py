"""The solve's compiled memory at LLaMA-2-7B shapes: the layer whole against rows in chunks.

``fw_jax.solve_layer`` is one compiled call per layer; at 7B shapes its XLA temporaries, not the
model, set ``sparsefw``'s peak memory (``results/scale.md``). Per-row and n:m budgets let the
solve run over chunks of rows in turn (``SolverOptions.row_chunk``; by default chunks of about
2²² weights), so that every temporary is a chunk's size. This script compiles the solve of each
layer shape of a 7B block both ways and reports XLA's memory analysis (temporaries, arguments,
outputs), and, unless ``--no-run``, runs both on a random layer (``--max-iter`` iterations, Wanda
warm start, α = 0.9, as ``sparsefw``) to check they give the same mask, with their seconds.

    python benchmarks/solve_memory.py                 # 7B shapes, compile and run (minutes)
    python benchmarks/solve_memory.py --tiny --results /tmp/r.json   # seconds: the tests' run

Results: a key in ``results/scale.json`` (the rest kept) and a section of ``results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rounding import LAYERS_PER_BLOCK, SHAPES  # noqa: E402
from bench_scale import head_commit, run_fields, save_section  # noqa: E402
from fw_jax import PerRow, SolverOptions  # noqa: E402
from fw_jax.solver._solve import _Config, _solve  # noqa: E402

KEYS = {"7b": "solve_memory", "tiny": "solve_memory_tiny"}
TITLES = {"7b": "## The solve's memory: the layer whole or in row chunks (7B shapes)",
          "tiny": "## The solve's memory: the layer whole or in row chunks (tiny; the tests' run)"}
TINY_CHUNK = 8  # rows per chunk in the tiny run (the default would solve such layers whole)


def layer(d_out: int, d_in: int, seed: int = 0):
    """A random layer and a Gram matrix of rank ``d_in`` (float32)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((d_out, d_in), dtype=np.float32)
    x = rng.standard_normal((d_in, d_in + 64), dtype=np.float32) * rng.gamma(2.0, size=(d_in, 1)).astype(np.float32)
    return jnp.asarray(weight), jnp.asarray(x @ x.T / x.shape[1])


def run(shape: str, max_iter: int, execute: bool) -> dict:
    rows = []
    for layers, (d_out, d_in) in SHAPES[shape].items():
        weight, gram = layer(d_out, d_in)
        args = (weight, gram, None, jnp.asarray(0.9, jnp.float32), jnp.asarray(1e-4, jnp.float32))
        chunked = SolverOptions(max_iter=max_iter, row_chunk=TINY_CHUNK if shape == "tiny" else None)
        row = dict(layers=layers, shape=[d_out, d_in], rows_per_chunk=chunked.rows_per_chunk(d_out, d_in))
        masks = {}
        for how, options in (("whole", SolverOptions(max_iter=max_iter, row_chunk=d_out)), ("chunked", chunked)):
            config = _Config(budget=PerRow(d_in // 2), saliency="wanda", options=options)
            start = time.perf_counter()
            compiled = _solve.lower(*args, config=config).compile()
            row[f"{how}_compile_seconds"] = time.perf_counter() - start
            memory = compiled.memory_analysis()
            row[f"{how}_temp_gb"] = memory.temp_size_in_bytes / 1e9
            row[f"{how}_argument_gb"] = memory.argument_size_in_bytes / 1e9
            row[f"{how}_output_gb"] = memory.output_size_in_bytes / 1e9
            if execute:
                start = time.perf_counter()
                solution = jax.block_until_ready(compiled(*args))
                row[f"{how}_seconds"] = time.perf_counter() - start
                row[f"{how}_loss"] = float(solution.loss)
                masks[how] = np.asarray(solution.mask)
        if execute:
            row["same_mask"] = bool(np.array_equal(masks["whole"], masks["chunked"]))
            row["differing_rows"] = int(np.any(masks["whole"] != masks["chunked"], axis=1).sum())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return dict(rows=rows)


def render(result: dict, shape: str) -> str:
    ran = "whole_seconds" in result["rows"][0]
    lines = [TITLES[shape], "", f"`{result['command']}` on {result['machine']}, {result['date']} (fw_jax "
             f"{result['commit']}, jax {result['jax']}; 5-minute load average {result['load_average']:.1f}). "
             f"XLA's compiled memory analysis of `solve_layer`'s body (per-row budget, half kept, Wanda warm start, "
             f"α = 0.9, {result['max_iter']} iterations" + ("; one timed call each, compile apart)." if ran else ")."),
             "", "| layers | shape | rows per chunk | temporaries GB, whole → chunked | arguments GB | outputs GB |"
             + (" seconds, whole / chunked | error, whole / chunked | rows whose mask differs |" if ran else ""),
             "|:--|:--|--:|--:|--:|--:|" + ("--:|--:|--:|" if ran else "")]
    for r in result["rows"]:
        line = (f"| {r['layers']} | {r['shape'][0]}×{r['shape'][1]} | {r['rows_per_chunk']} | "
                f"{r['whole_temp_gb']:.3g} → {r['chunked_temp_gb']:.3g} | {r['chunked_argument_gb']:.3g} | "
                f"{r['chunked_output_gb']:.3g} |")
        if ran:
            line += (f" {r['whole_seconds']:.3g} / {r['chunked_seconds']:.3g} | {r['whole_loss']:.6g} / "
                     f"{r['chunked_loss']:.6g} | {r['differing_rows']} of {r['shape'][0]} |")
        lines.append(line)
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds), for the tests")
    p.add_argument("--max-iter", type=int, default=5, help="Frank-Wolfe iterations (memory does not depend on it)")
    p.add_argument("--no-run", action="store_true", help="compile only: memory, no timing or mask comparison")
    p.add_argument("--results", default=str(ROOT / "results" / "scale.json"), help="JSON results (and .md beside it)")
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else "7b"
    results = pathlib.Path(args.results)
    commit = head_commit()
    result = run(shape, args.max_iter, not args.no_run)
    argv = list(sys.argv[1:] if argv is None else argv)
    result.update(run_fields("solve_memory.py", argv, commit), max_iter=args.max_iter)
    section = render(result, shape)
    save_section(results, KEYS[shape], result, TITLES[shape], section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
