"""Per-row selections by threshold searches against a lexicographic sort, at LLaMA-2-7B shapes.

``sparsefw`` selects the best ``count`` entries of every row three times per layer: Wanda's
mask (one key: the scores), the fixed entries (two keys: in the warm mask, then the scores) and
the rounding of the relaxed iterate (three keys: fixed, relaxed value, scores). They were
lexicographic sorts; ``fw_jax.solver.top_count_units`` makes the same selection by a threshold
search per key. This script times both on random keys shaped like the solve's (45% of the
entries fixed, half the relaxed values exactly 0), per layer shape of a 7B block, in one run,
checks that they select the same entries, and reports the compiled temporary memory. With the
per-phase profile of a block in the same JSON (``profile_block.py``), it also gives that
block's total with its sort phases (warm start, rounding) timed here instead.

    python benchmarks/bench_rounding.py           # 7B shapes (minutes)
    python benchmarks/bench_rounding.py --tiny --results /tmp/r.json   # seconds: the tests' run

Results: a key in ``results/scale.json`` (the rest kept) and a section of ``results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import head_commit, run_fields, save_section  # noqa: E402
from fw_jax.solver._select import top_count_lexsort, top_count_units  # noqa: E402

SHAPES = {"7b": {"q_proj, k_proj, v_proj, o_proj": (4096, 4096), "gate_proj, up_proj": (11008, 4096),
                 "down_proj": (4096, 11008)},
          "tiny": {"q_proj, k_proj, v_proj, o_proj": (16, 64), "gate_proj, up_proj": (40, 64), "down_proj": (16, 160)}}
LAYERS_PER_BLOCK = {"q_proj, k_proj, v_proj, o_proj": 4, "gate_proj, up_proj": 2, "down_proj": 1}
KEYS = {"7b": "rounding", "tiny": "rounding_tiny"}
TITLES = {"7b": "## Per-row selections: threshold searches against a sort (7B shapes)",
          "tiny": "## Per-row selections: threshold searches against a sort (tiny; the tests' run)"}
PROFILE_KEYS = {"7b": "profile_block", "tiny": "profile_block_tiny"}


def selections(d_out: int, d_in: int, seed: int = 0):
    """The three selections of a layer, as ``(name, keys, count)``, on random keys."""
    rng = np.random.default_rng(seed)
    k = d_in // 2
    scores = jnp.asarray(rng.random((d_out, d_in), dtype=np.float32))
    warm = jnp.asarray(rng.random((d_out, d_in)) < 0.5)
    fixed = jnp.asarray(rng.random((d_out, d_in)) < 0.45)
    relaxed = jnp.asarray(np.where(rng.random((d_out, d_in)) < 0.5, 0, rng.random((d_out, d_in))).astype(np.float32))
    return [("Wanda's mask (1 key)", (scores,), k), ("fixed entries (2 keys)", (warm, scores), int(0.9 * k)),
            ("rounding (3 keys)", (fixed, relaxed, scores), k)]


def _lexsort(keys, count):
    keys = tuple(k.astype(jnp.int32) if k.dtype == jnp.bool_ else k for k in keys)
    return jax.vmap(lambda *row: top_count_lexsort(row, count))(*keys)


def _time(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shape: str, repeats: int) -> dict:
    rows = []
    for layers, (d_out, d_in) in SHAPES[shape].items():
        for name, keys, count in selections(d_out, d_in):
            row = dict(layers=layers, shape=[d_out, d_in], selection=name)
            masks = {}
            for method, fn in (("threshold", top_count_units), ("lexsort", _lexsort)):
                compiled = jax.jit(lambda *k, fn=fn, count=count: fn(k, count)).lower(*keys).compile()
                row[f"{method}_seconds"] = _time(compiled, keys, repeats)
                row[f"{method}_temp_gb"] = compiled.memory_analysis().temp_size_in_bytes / 1e9
                masks[method] = np.asarray(compiled(*keys))
            row["same_selection"] = bool(np.array_equal(masks["threshold"], masks["lexsort"]))
            row["kept_per_row"] = sorted(set(masks["threshold"].sum(axis=1).tolist()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return dict(rows=rows)


def block_seconds(result: dict) -> dict:
    """Per block (7 layers), the three selections' seconds by each method."""
    total = {"threshold": 0.0, "lexsort": 0.0}
    for row in result["rows"]:
        for method in total:
            total[method] += LAYERS_PER_BLOCK[row["layers"]] * row[f"{method}_seconds"]
    return total


def render(result: dict, shape: str, profile: dict | None) -> str:
    lines = [TITLES[shape], "", f"`{result['command']}` on {result['machine']}, {result['date']} (fw_jax "
             f"{result['commit']}, jax {result['jax']}; medians of {result['repeats']} warm calls, compile apart; "
             f"5-minute load average {result['load_average']:.1f}). Random keys shaped like the solve's; count "
             "= half the row (the fixed entries: 0.9 of it).", "",
             "| layers | shape | selection | threshold (s) | lexsort (s) | speed-up | same entries | temp GB, threshold / lexsort |",
             "|:--|:--|:--|--:|--:|--:|:--|--:|"]
    for r in result["rows"]:
        lines.append(f"| {r['layers']} | {r['shape'][0]}×{r['shape'][1]} | {r['selection']} | "
                     f"{r['threshold_seconds']:.3g} | {r['lexsort_seconds']:.3g} | "
                     f"{r['lexsort_seconds'] / r['threshold_seconds']:.1f}× | {'yes' if r['same_selection'] else 'NO'} | "
                     f"{r['threshold_temp_gb']:.2f} / {r['lexsort_temp_gb']:.2f} |")
    block = block_seconds(result)
    lines += ["", f"Per block (4 + 2 + 1 layers): {block['threshold']:.3g} s by threshold searches against "
              f"{block['lexsort']:.3g} s by sorts."]
    if profile is not None:
        s = profile["summary"]["seconds"]
        sorts = s["warm_start"] + s["rounding"]
        total = profile["summary"]["total"]
        # the profile's warm start and rounding hold these selections as sorts: scale them by this
        # run's ratio (its sorts ran on other keys and under another load than the profile's)
        ratio = block["threshold"] / block["lexsort"]
        new_total = total - sorts + sorts * ratio
        outside = new_total - s["fw_iterations"]
        lines[-1] += (f" The per-phase profile above (fw_jax {profile['commit']}) timed its warm start and rounding, "
                      f"which hold these selections as sorts, at {sorts:.0f} s of its {total:.0f} s block; at this "
                      f"run's ratio ({ratio:.3f}) they take {sorts * ratio:.0f} s by threshold searches, the block "
                      f"{new_total:.0f} s (computed, not run), and everything outside the Frank-Wolfe iterations "
                      f"{100 * outside / new_total:.1f}% of it (the profile: "
                      f"{100 * (total - s['fw_iterations']) / total:.1f}%).")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds), for the tests")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=str(ROOT / "results" / "scale.json"), help="JSON results (and .md beside it)")
    args = p.parse_args(argv)
    shape = "tiny" if args.tiny else "7b"
    results = pathlib.Path(args.results)
    commit = head_commit()
    result = run(shape, args.repeats)
    argv = list(sys.argv[1:] if argv is None else argv)
    result.update(run_fields("bench_rounding.py", argv, commit), repeats=args.repeats)
    profile = json.loads(results.read_text()).get(PROFILE_KEYS[shape]) if results.exists() else None
    section = render(result, shape, profile)
    save_section(results, KEYS[shape], result, TITLES[shape], section)
    print(section)
    return 0 if all(r["same_selection"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
