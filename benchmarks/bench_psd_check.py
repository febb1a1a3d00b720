"""What the Gram matrix check costs: Lanczos (fw_jax's) against a Cholesky factorisation.

``solve_layer`` refuses a Gram matrix that is clearly not positive semidefinite before it claims
a lower bound (``fw_jax/solver/_psd.py``). Two cheap ways to look: 32 Lanczos steps with full
reorthogonalisation (what fw_jax does), or a Cholesky factorisation of ``G + εI`` (fails iff
``G + εI`` is not PD). Both are timed here in one run on PSD Gram matrices of LLaMA-7B's input
sizes (4096, 11008) and of SmolLM2's (576, 1536), next to one Frank-Wolfe iteration's product
``(rows, d) × (d, d)`` for scale: medians of ``--repeats`` warm calls, compile apart, float32.

    python benchmarks/bench_psd_check.py            # → results/psd_check.md / .json
    python benchmarks/bench_psd_check.py --tiny     # the tests' smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_solver import timed  # noqa: E402  (first call, median of the repeats, last result)
from fw_jax.pipeline import atomic_write  # noqa: E402
from fw_jax.solver._psd import negative_curvature  # noqa: E402


def gram_of(d, tokens, seed):
    """A PSD Gram matrix of correlated activations with outlier channels, as LLM inputs have."""
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (d, tokens), jnp.float32)
    x = x.at[: max(1, d // 64)].multiply(20.0)
    return jax.block_until_ready(jax.jit(lambda x: x @ x.T)(x))


def row(d, rows, tokens, repeats):
    gram = gram_of(d, tokens, seed=d)
    weight = jax.random.normal(jax.random.PRNGKey(1), (rows, d), jnp.float32)
    lanczos_first, lanczos, (smallest, largest) = timed(lambda: negative_curvature(gram), repeats)
    eps = 1e-4 * float(largest)
    chol = jax.jit(lambda g: jnp.linalg.cholesky(g + eps * jnp.eye(d, dtype=g.dtype)))
    chol_first, cholesky, factor = timed(lambda: chol(gram), repeats)
    product = jax.jit(lambda w, g: w @ g)
    _, iteration, _ = timed(lambda: product(weight, gram), repeats)
    return {
        "d": d, "rows": rows, "tokens": tokens,
        "lanczos_s": lanczos, "lanczos_first_s": lanczos_first,
        "cholesky_s": cholesky, "cholesky_first_s": chol_first,
        "cholesky_over_lanczos": cholesky / lanczos,
        "fw_product_s": iteration, "lanczos_over_fw_product": lanczos / iteration,
        "smallest_over_largest": float(smallest) / float(largest),
        "cholesky_ok": bool(np.all(np.isfinite(np.asarray(factor)))),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, for the tests")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "psd_check"))
    args = parser.parse_args(argv)
    # (d, rows of the layer timed for one Frank-Wolfe product, calibration tokens)
    shapes = [(64, 32, 128), (128, 32, 256)] if args.tiny else [
        (576, 576, 2048), (1536, 576, 2048), (4096, 256, 4096), (11008, 256, 4096)]
    rows = []
    for d, r, t in shapes:
        rows.append(row(d, r, t, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    command = "python benchmarks/bench_psd_check.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
            "jax": jax.__version__, "peak_rss_mb": peak_rss_mb}
    atomic_write(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Gram matrix check: Lanczos against Cholesky", "",
        f"`{command}` on {meta['machine']}, jax {meta['jax']}; peak RSS {peak_rss_mb:.0f} MB.",
        "Medians of warm calls in seconds, compile apart (first calls in the JSON). `FW product`:",
        "one Frank-Wolfe iteration's `(rows, d) × (d, d)` product, for scale; real layers have",
        "more rows (LLaMA-7B's `down_proj`: 4096 × 11008), so the check is a smaller share there.", "",
        "| d | Lanczos (32 steps) s | Cholesky s | Cholesky / Lanczos | FW product s (rows) | λ_min/λ_max found |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['d']} | {r['lanczos_s']:.4f} | {r['cholesky_s']:.4f} | {r['cholesky_over_lanczos']:.1f}× "
                     f"| {r['fw_product_s']:.4f} ({r['rows']}) | {r['smallest_over_largest']:.2e} |")
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
