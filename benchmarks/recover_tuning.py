"""Block-wise recovery on the first blocks of SmolLM2-135M: loss against the dense block before
and after, and seconds, for several learning rates and step counts (issue 20: settle the
``RecoverSettings`` defaults on a real model, not on the tiny test model).

Every candidate tunes the same pruned block from the same inputs (the pruned model's inputs,
the blocks before pruned but *not* recovered), so the rows of one block compare like with like.
Calibration as in the quality table: random windows of five Austen novels (Persuasion held out).

    python benchmarks/recover_tuning.py --blocks 3 --method wanda
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]

from fw_jax import models  # noqa: E402
from fw_jax.pipeline import PruneSettings, RecoverSettings, atomic_write, format_table, load_documents  # noqa: E402
from fw_jax.pipeline.data import calibration_tokens  # noqa: E402
from fw_jax.pipeline.prune import _prune_block  # noqa: E402
from fw_jax.pipeline.recover import recover_block  # noqa: E402
from fw_jax import _progress  # noqa: E402
from real_layers import calibration_books  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=3, help="the first N blocks")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--reconstruct", action="store_true")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, nargs="+", default=[100])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "results" / "recover_tuning"))
    args = parser.parse_args()
    command = "python benchmarks/recover_tuning.py " + shlex.join(sys.argv[1:])
    started = time.perf_counter()

    loaded = models.load_model("smollm2-135m", dtype="float32")
    documents = load_documents(calibration_books())
    tokens = calibration_tokens(loaded.tokenizer, documents, args.nsamples, args.seqlen, 0)
    settings = PruneSettings(method=args.method, sparsity=args.sparsity, reconstruct=args.reconstruct)
    model = loaded.model
    hidden = models.embed(model, jnp.asarray(tokens))
    dense = hidden
    out = pathlib.Path(args.out)
    # rows of earlier runs (other learning rates or step counts) are kept; a row run again is replaced
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    rows = earlier.get("rows", [])
    commands = earlier.get("commands", [])
    this_run = {"command": command, "seconds": 0.0}
    commands.append(this_run)
    for b in range(args.blocks):
        target = models.run_block(model, b, dense)
        _prune_block(loaded, b, hidden, settings, None, None, _progress.Progress(_progress.QUIET), False)
        pruned = {layer.name: layer.weight for layer in models.block_linears(model, b)}
        for steps in args.steps:
            for lr in args.lrs:
                models.set_linear_weights(model, pruned)
                candidate = RecoverSettings(steps=steps, learning_rate=lr)
                record = recover_block(model, b, hidden, target, candidate)
                row = {"block": b, "max_steps": steps, "lr": lr, "method": settings.describe(), **record}
                rows = [r for r in rows if (r["block"], r["max_steps"], r["lr"], r.get("method")) !=
                        (b, steps, lr, row["method"])] + [row]
                print(json.dumps(row), flush=True)
                this_run["seconds"] = time.perf_counter() - started
                write(out, rows, commands, args, settings)
        models.set_linear_weights(model, pruned)  # the next block sees the un-recovered pruned model
        hidden = models.run_block(model, b, hidden)
        dense = target



def write(out, rows, commands, args, settings):
    rows = sorted(rows, key=lambda r: (r.get("method", ""), r["block"], r["max_steps"], r["lr"]))
    methods = sorted({r.get("method", settings.describe()) for r in rows})
    table = {(f"{r['method']}: " if len(methods) > 1 else "") + f"block {r['block']}, lr {r['lr']:g}, ≤{r['max_steps']} steps": {
        "loss before": f"{r['loss_before']:.4f}", "loss after": f"{r['loss_after']:.4f}",
        "held-out before": f"{r['heldout_before']:.4f}", "held-out after": f"{r['heldout_after']:.4f}",
        "steps": str(r["steps"]), "stopped": r["stopped"], "s": f"{r['seconds']:.1f}"} for r in rows}
    text = "\n".join([
        f"# Block-wise recovery on the first blocks of SmolLM2-135M ({'; '.join(methods)})",
        "",
        f"Produced on {platform.machine()} ({jax.default_backend()}, {jax.local_device_count()} device), "
        f"jax {jax.__version__}, by:",
        "",
        *[f"- `{c['command']}` — {c['seconds'] / 60:.0f} min" for c in commands],
        "",
        f"Calibration: {args.nsamples} windows × {args.seqlen} tokens of five Austen novels (Persuasion held out), "
        "seed 0. Loss: ‖dense block(dense inputs) − pruned block(pruned inputs)‖² / ‖dense block(dense inputs)‖² on "
        "all calibration windows; held-out: on the last 1/8 of them, which recovery does not train on. "
        "Every row of a block starts from the same pruned weights and inputs. Seconds include compiling the step "
        "(once per learning rate) and were measured on a shared 2-core machine.",
        "",
        format_table(table),
        "",
    ])
    atomic_write(str(out) + ".md", text)
    atomic_write(str(out) + ".json", json.dumps({"commands": commands, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
