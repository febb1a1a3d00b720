"""Why ``--recover`` hurts Gemma 3 270M: one block's recovery, its errors and the model's loss.

On Gemma 3 270M, ``sparsefw --reconstruct --recover`` at 50% gave 136.5 / 1373.4 perplexity
against 47.0 / 35.5 without recovery (``results/quality-gemma3.md``), although every recovered
block's loss against the dense block fell. This script takes a saved pruned model (the quality
table's ``--reconstruct`` run by default), recovers one block exactly as the pipeline does
(``recover_block`` on the pruned model's inputs toward the dense block's outputs, the same 32
calibration windows), and reports, before and after, on the calibration windows and on held-out
Persuasion windows:

- the block loss that recovery minimises (squared error relative to the dense output's energy);
- the error with every channel relative to its own energy (Gemma's residual stream has a few
  massive channels that hold most of the energy, so the block loss is mostly theirs);
- the error of each position divided by its root mean square (what the next RMSNorm receives);
- the mean next-token loss of the whole model on the Persuasion windows.

It also reports the share of the stream's energy in its four largest channels, and the spread of
the RMSNorm weights that read it (``1 + w`` in Gemma).

    python benchmarks/recover_gemma3.py --block 16 --lrs 3e-3 3e-4
    python benchmarks/recover_gemma3.py --dense TINY --pruned TINY_PRUNED --block 0 --nsamples 2 --seqlen 32 \
        --windows 2 --results /tmp/r                # seconds: the tests' run, on a tiny model

Results: ``results/recover_gemma3.json`` and ``.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fw_jax import models  # noqa: E402
from fw_jax.pipeline import RecoverSettings, atomic_write, load_documents  # noqa: E402
from fw_jax.pipeline.data import calibration_tokens, evaluation_tokens  # noqa: E402
from fw_jax.pipeline.recover import recover_block  # noqa: E402
from real_layers import CORPORA, calibration_books  # noqa: E402

PRUNED = ROOT / "runs" / "quality-gemma3" / "50-sparsefw-α-0-9-ρ-0-5--reconstruct"


def stream_to(model, tokens, b: int):
    """The inputs of block ``b`` of ``model`` on ``tokens``."""
    hidden = models.embed(model, jnp.asarray(tokens))
    for i in range(b):
        hidden = models.run_block(model, i, hidden)
    return hidden


def _unit(x):
    return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True))


def errors(out, target) -> dict:
    """The block loss and the two other readings of the same error (see the module docstring)."""
    relative = lambda a, b: float(jnp.sum((a - b) ** 2) / jnp.sum(b**2))  # noqa: E731
    scale = jax.lax.rsqrt(jnp.mean(target**2, axis=(0, 1)))
    return {"block loss": relative(out, target), "per channel": relative(out * scale, target * scale),
            "per position, RMS-normalised": relative(_unit(out), _unit(target))}


def next_token_loss(model, held: np.ndarray, bos) -> float:
    """Mean next-token loss over the windows ``held`` (BOS first where ``bos`` is not ``None``), by
    :func:`fw_jax.models.perplexity` one window at a time (a 262k vocabulary)."""
    text = held[:, 1:] if bos is not None else held
    return math.log(models.perplexity(model, text.reshape(-1), held.shape[1], bos_per_window=bos is not None,
                                      bos_id=bos, batch_size=1))


def norm_weights(model, b: int) -> dict:
    """``1 + w`` (Gemma's RMSNorm scale) of the norm that reads block ``b``'s output: the next
    block's input norm, or the final one."""
    last = b + 1 >= models.num_blocks(model)
    name = "model.norm.weight" if last else f"model.layers.{b + 1}.input_layernorm.weight"
    w = 1 + np.asarray(models.get_param(model, name), np.float64)
    return {"name": name, "min": float(w.min()), "median": float(np.median(w)), "max": float(w.max())}


def run(dense, pruned_path: str, b: int, lrs: list[float], nsamples: int, seqlen: int, windows: int) -> dict:
    tok = dense.tokenizer
    bos = tok.bos_token_id
    calib = calibration_tokens(tok, load_documents(calibration_books()), nsamples, seqlen, 0, bos_id=bos)
    ids = evaluation_tokens(tok, load_documents(str(CORPORA / "austen_persuasion.txt")))
    first = [] if bos is None else [bos]  # BOS starts every window, as Gemma expects
    text = seqlen - len(first)
    held = np.stack([np.concatenate([first, ids[i * text:(i + 1) * text]]).astype(np.int32) for i in range(windows)])
    targets = {name: models.run_block(dense.model, b, stream_to(dense.model, t, b)) for name, t in
               (("calibration", calib), ("Persuasion", held))}
    top = jnp.sort(jnp.sum(targets["calibration"] ** 2, axis=(0, 1)))
    result = {"block": b, "top4_energy_share": float(top[-4:].sum() / top.sum()),
              "norm_weights": norm_weights(dense.model, b), "dense_loss": next_token_loss(dense.model, held, bos), "rows": []}
    for lr in lrs:
        pruned = models.load_model(pruned_path, dtype="auto")
        inputs = {name: stream_to(pruned.model, t, b) for name, t in (("calibration", calib), ("Persuasion", held))}
        row = {"learning_rate": lr}
        for when in ("before", "after"):
            if when == "after":
                record = recover_block(pruned.model, b, inputs["calibration"], targets["calibration"],
                                       RecoverSettings(learning_rate=lr))
                row["record"] = {k: v for k, v in record.items() if k != "seconds"}
            for name in inputs:
                row[f"{name} {when}"] = errors(models.run_block(pruned.model, b, inputs[name]), targets[name])
            row[f"next-token loss {when}"] = next_token_loss(pruned.model, held, bos)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    return result


def render(result: dict) -> str:
    nw = result["norm_weights"]
    lines = ["# Recovery on Gemma 3 270M: one block", "",
             f"`{result['command']}` on {result['machine']}, {result['date']} (fw_jax {result['commit']}, "
             f"jax {result['jax']}). Pruned model: `{result['pruned']}`; block {result['block']}, recovered as "
             "`--recover` does (its defaults but the learning rate) on the same calibration windows; errors against "
             f"the dense block on those windows and on {result['windows']} held-out Persuasion windows; next-token loss "
             f"of the whole model on the Persuasion windows (dense: {result['dense_loss']:.4f}).", "",
             f"The dense block's output: its four largest channels hold {100 * result['top4_energy_share']:.0f}% of "
             f"the energy. `{nw['name']}`, the RMSNorm that reads it, weighs channels from {nw['min']:.3g} "
             f"to {nw['max']:.3g} (median {nw['median']:.3g}).", "",
             "| learning rate | stopped | windows | block loss, before → after | per channel | per position, RMS-normalised |",
             "|--:|:--|:--|--:|--:|--:|"]
    for row in result["rows"]:
        for name in ("calibration", "Persuasion"):
            b, a = row[f"{name} before"], row[f"{name} after"]
            lines.append(f"| {row['learning_rate']:g} | {row['record']['stopped']} | {name} | " + " | ".join(
                f"{b[k]:.4g} → {a[k]:.4g}" for k in ("block loss", "per channel", "per position, RMS-normalised"))
                + " |")
    lines += ["", "| learning rate | next-token loss, before → after |", "|--:|--:|"]
    lines += [f"| {row['learning_rate']:g} | {row['next-token loss before']:.4f} → {row['next-token loss after']:.4f} |"
              for row in result["rows"]]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", default=str(PRUNED), help="a saved pruned model (default: the quality table's "
                                                          "sparsefw --reconstruct run at 50%%)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 3e-4], help="recovery learning rates")
    p.add_argument("--windows", type=int, default=8, help="held-out Persuasion windows")
    p.add_argument("--dense", default="gemma3-270m", help="the dense model --pruned was pruned from")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (as the quality table)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--results", default=str(ROOT / "results" / "recover_gemma3"), help="results, without suffix")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dense = models.load_model(args.dense, dtype="auto")
    result = run(dense, args.pruned, args.block, args.lrs, args.nsamples, args.seqlen, args.windows)
    argv = list(sys.argv[1:] if argv is None else argv)
    result.update(command=shlex.join(["python", "benchmarks/recover_gemma3.py", *argv]), date=time.strftime("%Y-%m-%d"),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores", commit=commit, jax=jax.__version__,
                  pruned=os.path.relpath(args.pruned, ROOT), windows=args.windows)
    out = pathlib.Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=1))
    text = render(result)
    atomic_write(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
