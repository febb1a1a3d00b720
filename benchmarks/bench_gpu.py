"""Prune a LLaMA-2-7B-shaped model end to end on one accelerator (issue 16's GPU script).

The model is made on the device with random weights (N(0, 0.02), norms 1, bfloat16 values held
in float32 as fw_jax computes), so no checkpoint is needed; calibration tokens are random ids.
It is pruned with ``prune_model`` block by block, as ``fw-jax prune`` does, with the ``sparsefw``
defaults and with the published recipe (``sparsefw-published``: α = 0.9, 2000 open-loop
iterations), and reports:

- time per block (the first block apart: it compiles) and in all;
- peak device memory (``memory_stats()["peak_bytes_in_use"]``) and peak host RSS;
- the device's measured GEMM rates (8192³ in float32 with ``precision=HIGHEST``, default
  precision, which is TF32 on NVIDIA GPUs, and bfloat16), and the achieved rate of the solve,
  estimated as ``iterations · 2·d_out·d_in²`` per layer (one dense gradient product per
  iteration; the solver's own products are fewer or cheaper, so this is an upper bound on the
  work and the rate is an upper estimate).

    python benchmarks/bench_gpu.py                                  # on the accelerator
    python benchmarks/bench_gpu.py --shape tiny --blocks 2 --nsamples 2 --seqlen 16   # seconds on a CPU

Results: ``results/gpu.json`` and ``results/gpu.md`` (``--results``). Without an accelerator
the script still runs (on the CPU), and says so in the results.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4),
}
RECIPES = {
    "defaults": dict(method="sparsefw"),
    "published": dict(method="sparsefw-published"),
}


def gemm_rates(n: int = 8192, repeats: int = 5) -> dict:
    """TFLOP/s of an n×n×n matmul in float32 (HIGHEST), default precision, and bfloat16."""
    out = {}
    key = jax.random.PRNGKey(0)
    for name, dtype, precision in (("float32", jnp.float32, jax.lax.Precision.HIGHEST),
                                   ("default (tf32 on NVIDIA)", jnp.float32, jax.lax.Precision.DEFAULT),
                                   ("bfloat16", jnp.bfloat16, jax.lax.Precision.DEFAULT)):
        a = jax.random.normal(key, (n, n), dtype)
        f = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
        f(a, a).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - start)
        out[name] = 2 * n**3 / statistics.median(times) / 1e12
    return out


def random_model(shape: str, blocks: int, seed: int = 0):
    """A LoadedModel of ``shape`` with random bfloat16-valued weights, made on the default device."""
    import transformers
    from flax import nnx

    from fw_jax import models
    from fw_jax.models._llama import LlamaForCausalLM, LlamaSpec
    from fw_jax.models._params import param_shapes, set_param

    config = transformers.LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, **SHAPES[shape])
    model = nnx.eval_shape(lambda: LlamaForCausalLM(LlamaSpec.from_hf(config)))
    key = jax.random.PRNGKey(seed)
    dtypes = {}
    for i, (name, shape_) in enumerate(param_shapes(model).items()):
        if name.endswith("norm.weight"):
            value = jnp.ones(shape_, jnp.float32)
        else:
            value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape_, jnp.float32))
            value = value.astype(jnp.bfloat16).astype(jnp.float32)
        set_param(model, name, value)
        dtypes[name] = "bfloat16"
    return models.LoadedModel(model=model, config=config, tokenizer=None, family="llama", source=f"random-{shape}",
                              dtypes=dtypes, dtype="auto")


def solve_flops(loaded, iterations: int) -> float:
    """``iterations · 2·d_out·d_in²`` summed over the layers (see the module docstring)."""
    from fw_jax import models

    total = 0.0
    for b in range(models.num_blocks(loaded.model)):
        for layer in models.block_linears(loaded.model, b):
            d_out, d_in = layer.weight.shape
            total += iterations * 2.0 * d_out * d_in * d_in
    return total


def run(shape: str, blocks: int, recipe: str, nsamples: int, seqlen: int, max_iter: int | None) -> dict:
    from fw_jax.pipeline import PruneSettings, prune_model

    loaded = random_model(shape, blocks)
    tokens = np.random.default_rng(0).integers(0, loaded.config.vocab_size, size=(nsamples, seqlen)).astype(np.int32)
    from fw_jax import SolverOptions

    options = dict(RECIPES[recipe])
    if max_iter is not None and recipe == "defaults":
        options["options"] = SolverOptions(max_iter=max_iter)
    settings = PruneSettings.from_options(**options)
    stamps = [time.perf_counter()]
    report = prune_model(loaded, tokens, settings, progress=False, after_block=lambda b: stamps.append(time.perf_counter()))
    block_seconds = np.diff(stamps).tolist()
    iterations = [r.get("iterations") for r in report.layers]
    mean_iter = float(np.mean([i for i in iterations if i is not None])) if any(i is not None for i in iterations) \
        else (2000.0 if recipe == "published" else float(settings.method.options.max_iter))
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    steady = block_seconds[1:] or block_seconds
    solve_seconds = sum(r["seconds"] for r in report.layers)
    return {
        "shape": shape, "blocks": blocks, "recipe": recipe, "settings": settings.record(),
        "nsamples": nsamples, "seqlen": seqlen,
        "first_block_seconds": block_seconds[0], "median_block_seconds": statistics.median(steady),
        "total_seconds": report.seconds, "layer_solve_seconds": solve_seconds, "mean_iterations": mean_iter,
        "solve_tflops_estimate": solve_flops(loaded, mean_iter) / max(solve_seconds, 1e-9) / 1e12,
        "peak_device_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "mean_error_vs_wanda": report.summary()["mean_error_vs_wanda"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-iter", type=int, default=None, help="sparsefw defaults: override max_iter")
    p.add_argument("--gemm-size", type=int, default=8192)
    p.add_argument("--results", default=str(ROOT / "results" / "gpu.json"))
    args = p.parse_args(argv)
    device = jax.devices()[0]
    meta = {"device": f"{device.device_kind} ({jax.default_backend()})", "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
            "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "accelerator": jax.default_backend() != "cpu"}
    meta["gemm_tflops"], meta["gemm_size"] = gemm_rates(args.gemm_size), args.gemm_size
    rows = []
    for recipe in args.recipes:
        rows.append(run(args.shape, args.blocks, recipe, args.nsamples, args.seqlen, args.max_iter))
        print(json.dumps(rows[-1]), flush=True)
    results = pathlib.Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    _write_markdown(meta, rows, results.with_suffix(".md"))
    return 0


def _write_markdown(meta: dict, rows: list, path: pathlib.Path) -> None:
    gemm = ", ".join(f"{k} {v:.1f}" for k, v in meta["gemm_tflops"].items())
    lines = ["# Pruning on one accelerator", "",
             f"`{meta['command']}` on {meta['device']}, {meta['date']}, jax {meta['jax']}."
             + ("" if meta["accelerator"] else " **No accelerator: this ran on the CPU.**"), "",
             f"Measured GEMM rates (TFLOP/s, one {meta['gemm_size']}³ matmul, median of 5): {gemm}.", "",
             "| model | recipe | blocks | calibration | first block (s, compiles) | median block (s) | total (s) | "
             "solve TFLOP/s (upper est.) | peak device (GB) | peak RSS (GB) | error vs Wanda |",
             "|:--|:--|--:|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        device_gb = f"{r['peak_device_gb']:.1f}" if r["peak_device_gb"] else "-"
        lines.append(f"| {r['shape']} | {r['recipe']} | {r['blocks']} | {r['nsamples']}×{r['seqlen']} | "
                     f"{r['first_block_seconds']:.1f} | {r['median_block_seconds']:.1f} | {r['total_seconds']:.0f} | "
                     f"{r['solve_tflops_estimate']:.2f} | {device_gb} | {r['peak_rss_gb']:.1f} | "
                     f"{r['mean_error_vs_wanda']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
