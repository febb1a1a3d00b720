"""Block-wise recovery on the first blocks of SmolLM2-135M: loss against the dense block before
and after, and seconds, for several learning rates and step counts (issue 20: settle the
``RecoverSettings`` defaults on a real model, not on the tiny test model).

Every candidate tunes the same pruned block from the same inputs (the pruned model's inputs,
the blocks before pruned but *not* recovered), so the rows of one block compare like with like.
Calibration as in the quality table: random windows of five Austen novels (Persuasion held out).
Each row also reports the block's loss on windows of another domain (``--probe``, by default
``pydoc-calib``: Python's documentation, disjoint from the ``pydoc-eval`` text the quality table
scores), fed through the same pruned blocks and never trained on: recovery fits one domain, and
this column shows what it does to another.

    python benchmarks/recover_tuning.py --blocks 3 --method wanda
    python benchmarks/recover_tuning.py --blocks 2 --lrs 3e-3 --steps 50 --proximals 0 1 10
    python benchmarks/recover_tuning.py --blocks 2 --lrs 3e-3 --steps 50 --dense-pulls 0.1 1 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

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
    parser.add_argument("--proximals", type=float, nargs="+", default=[0.0], help="RecoverSettings.proximal values")
    parser.add_argument("--dense-pulls", type=float, nargs="+", default=[0.0],
                        help="RecoverSettings.dense_pull values")
    parser.add_argument("--probe", default="pydoc-calib", help="out-of-domain text whose block loss is reported")
    parser.add_argument("--probe-samples", type=int, default=8)
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
    probe_tokens = calibration_tokens(loaded.tokenizer, load_documents(args.probe), args.probe_samples, args.seqlen, 0)
    probe_hidden = probe_dense = models.embed(model, jnp.asarray(probe_tokens))
    out = pathlib.Path(args.out)
    # rows of earlier runs (other learning rates or step counts) are kept; a row run again is replaced
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    rows = earlier.get("rows", [])
    commands = earlier.get("commands", [])
    this_run = {"command": command, "seconds": 0.0}
    commands.append(this_run)
    for b in range(args.blocks):
        target = models.run_block(model, b, dense)
        probe_target = models.run_block(model, b, probe_dense)
        dense_weights = {layer.name: layer.weight for layer in models.block_linears(model, b)}
        energies = _prune_block(loaded, b, hidden, settings, None, None, _progress.Progress(_progress.QUIET),
                                False).energies
        pruned = {layer.name: layer.weight for layer in models.block_linears(model, b)}
        probe_before = relative_error(models.run_block(model, b, probe_hidden), probe_target)
        for steps, lr, proximal, pull in itertools.product(args.steps, args.lrs, args.proximals, args.dense_pulls):
            models.set_linear_weights(model, pruned)
            candidate = RecoverSettings(steps=steps, learning_rate=lr, proximal=proximal, dense_pull=pull)
            record = recover_block(model, b, hidden, target, candidate,
                                   {name: (w, energies[name]) for name, w in dense_weights.items()})
            row = {"block": b, "max_steps": steps, "lr": lr, "proximal": proximal, "dense_pull": pull,
                   "method": settings.describe(), "nsamples": args.nsamples,
                   **record, "probe": args.probe, "probe_before": probe_before,
                   "probe_after": relative_error(models.run_block(model, b, probe_hidden), probe_target)}
            rows = [r for r in rows if key(r) != key(row)] + [row]
            print(json.dumps(row), flush=True)
            this_run["seconds"] = time.perf_counter() - started
            write(out, rows, commands, args, settings)
        models.set_linear_weights(model, pruned)  # the next block sees the un-recovered pruned model
        hidden = models.run_block(model, b, hidden)
        probe_hidden = models.run_block(model, b, probe_hidden)
        dense, probe_dense = target, probe_target


def key(row: dict) -> tuple:
    """What identifies a row (rows of earlier runs lack the later fields: their defaults)."""
    return (row.get("method", ""), row["block"], row["max_steps"], row["lr"], row.get("proximal", 0.0),
            row.get("dense_pull", 0.0), row.get("nsamples", 32))


def relative_error(out, target) -> float:
    """‖out − target‖² / ‖target‖², in float64."""
    out, target = np.asarray(out, np.float64), np.asarray(target, np.float64)
    return float(np.sum((out - target) ** 2) / np.sum(target**2))



def write(out, rows, commands, args, settings):
    rows = sorted(rows, key=key)
    methods = sorted({r.get("method", settings.describe()) for r in rows})
    table = {(f"{r['method']}: " if len(methods) > 1 else "") + f"block {r['block']}, lr {r['lr']:g}, ≤{r['max_steps']} steps"
             + (f", proximal {r['proximal']:g}" if r.get("proximal") else "")
             + (f", dense pull {r['dense_pull']:g}" if r.get("dense_pull") else "")
             + (f", {r['nsamples']} windows" if r.get("nsamples", 32) != 32 else ""): {
        "loss before": f"{r['loss_before']:.4f}", "loss after": f"{r['loss_after']:.4f}",
        "held-out before": f"{r['heldout_before']:.4f}", "held-out after": f"{r['heldout_after']:.4f}",
        "probe before": f"{r['probe_before']:.4f}" if "probe_before" in r else "-",
        "probe after": f"{r['probe_after']:.4f}" if "probe_after" in r else "-",
        "steps": str(r["steps"]), "stopped": r["stopped"], "s": f"{r['seconds']:.1f}"} for r in rows}
    text = "\n".join([
        f"# Block-wise recovery on the first blocks of SmolLM2-135M ({'; '.join(methods)})",
        "",
        f"Produced on {platform.machine()} ({jax.default_backend()}, {jax.local_device_count()} device), "
        f"jax {jax.__version__}, by:",
        "",
        *[f"- `{c['command']}` — {c['seconds'] / 60:.0f} min" for c in commands],
        "",
        f"Calibration: 32 windows × {args.seqlen} tokens of five Austen novels (Persuasion held out), "
        "seed 0, unless the row names another number of windows (the first 32 of those are the same 32). "
        "Loss: ‖dense block(dense inputs) − pruned block(pruned inputs)‖² / ‖dense block(dense inputs)‖² on "
        "all calibration windows; held-out: on the last 1/8 of them, which recovery does not train on; probe: "
        f"the same loss on {args.probe_samples} windows of `{args.probe}` (another domain, never trained on) fed "
        "through the same pruned blocks (`-` for rows measured before the probe existed). proximal: "
        "RecoverSettings.proximal, the pull toward the pre-recovery weights; dense pull: "
        "RecoverSettings.dense_pull, the pull toward the dense weights weighted by each input channel's energy. "
        "Every row of a block starts from the same pruned weights and inputs. Seconds include compiling the step "
        "(once per learning rate) and were measured on a shared 2-core machine.",
        "",
        format_table(table, first="run"),
        "",
    ])
    atomic_write(str(out) + ".md", text)
    atomic_write(str(out) + ".json", json.dumps({"commands": commands, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
