"""Peak memory and step time of ``fw-jax finetune`` with and without rematerialised blocks and
the chunked loss (``FinetuneSettings.remat``, ``loss_chunk``), on SmolLM2-135M distilling from
itself (the memory of a step does not depend on which weights are zero).

Every configuration runs in its own Python process (peak RSS is a process's high-water mark),
one after another in the same run, so the ratios against the plain configuration (``remat``
off, all positions' logits at once) compare like with like. Step time: the median of the steps
after the first (the first compiles), from the ``after_step`` callback; compile time apart.
On a GPU, peak device memory comes from ``jax.Device.memory_stats()`` (CPU has none).

    python benchmarks/bench_finetune_memory.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
CONFIGS = {  # name -> (remat, loss_chunk)
    "plain": (False, 0),
    "remat": (True, 0),
    "chunked loss": (False, 64),
    "remat + chunked loss (default)": (True, 64),
}


def worker(remat: bool, chunk: int, steps: int, batch: int, seqlen: int, out: str) -> dict:
    import jax

    from fw_jax.pipeline import FinetuneSettings, finetune

    stamps = []
    settings = FinetuneSettings(steps=steps, warmup=1, batch_size=batch, seqlen=seqlen, nsamples=steps * batch,
                                heldout=batch, eval_every=steps, save_every=max(1, steps - 1), remat=remat,
                                loss_chunk=chunk)
    started = time.perf_counter()
    report = finetune("smollm2-135m", out, str(CORPORA / "austen_emma.txt"), settings, teacher="smollm2-135m",
                      progress=False, after_step=lambda step: stamps.append(time.perf_counter()))
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_device_gb": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            "first_step_s": stamps[0] - started, "step_s": statistics.median(steps_s) if steps_s else None,
            "heldout_before": report["heldout_before"], "heldout_after": report["heldout_after"],
            "platform": device.platform}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=str(ROOT / "results" / "finetune_memory"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        remat, chunk = CONFIGS[args.worker]
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(worker(remat, chunk, args.steps, args.batch_size, args.seqlen, f"{tmp}/ft")))
        return
    command = "python benchmarks/bench_finetune_memory.py " + shlex.join(sys.argv[1:])
    rows = {}
    for name in args.configs:
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen)],
                              check=True, capture_output=True, text=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    base = rows.get("plain")
    lines = [
        "# `fw-jax finetune`: memory of rematerialised blocks and the chunked loss",
        "",
        f"Produced on {platform.machine()} ({next(iter(rows.values()))['platform']}, {os.cpu_count()} cores), by `{command}`.",
        "",
        f"SmolLM2-135M distilling from itself, {args.batch_size} windows × {args.seqlen} tokens a step, "
        f"{args.steps} steps (a checkpoint written after step {max(1, args.steps - 1)}), each configuration in "
        "its own process. Peak RSS includes loading the model and its teacher; step time is the median "
        "after the first (compiling) step, on a machine that may be shared, so read the ratios.",
        "",
        "| configuration | peak RSS GB | vs plain | peak device GB | step s | vs plain | first step s "
        "| held-out KL before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ratio = lambda key: f"{r[key] / base[key]:.2f}" if base and r[key] and base[key] else "-"  # noqa: E731
        device = "-" if r["peak_device_gb"] is None else f"{r['peak_device_gb']:.2f}"
        step = "-" if r["step_s"] is None else f"{r['step_s']:.1f}"
        lines.append(f"| {name} | {r['peak_rss_gb']:.2f} | {ratio('peak_rss_gb')} | {device} | {step} | "
                     f"{ratio('step_s')} | {r['first_step_s']:.1f} | {r['heldout_before']:.5f} | "
                     f"{r['heldout_after']:.5f} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
