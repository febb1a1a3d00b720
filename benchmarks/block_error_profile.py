"""Where a pruned model's block-output error lives, block by block: the quantity ``--recover``
minimises (‖dense block(dense inputs) − pruned block(pruned inputs)‖² / ‖dense block(dense
inputs)‖², on calibration windows), and how much of it, and of the target's energy, sits at the
first position of the windows and in the three channels of largest target energy.

Many small LLMs put a few "massive activations" on the first token from some block on; there the
target's energy is almost all at one position, so the relative loss is small and a fair part of
it is that one token's error. This tells whether recovery's objective is dominated by it.

    python benchmarks/block_error_profile.py runs/quality/50-sparsefw-α-0-9-ρ-0-5--reconstruct--recover
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
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

from fw_jax import models  # noqa: E402
from fw_jax.pipeline import atomic_write, format_table, load_documents  # noqa: E402
from fw_jax.pipeline.data import calibration_tokens  # noqa: E402
from real_layers import calibration_books  # noqa: E402


def _share(part, whole) -> float:
    """``part / whole``, 0 where there is no error at all (the dense model against itself)."""
    return float(part / whole) if whole > 0 else 0.0


def profile(dense_model, pruned_model, tokens) -> list[dict]:
    """Per block: the relative error of the pruned block's output (on the pruned model's inputs)
    against the dense block's (on the dense inputs), and its parts (see the module docstring)."""
    tokens = jnp.asarray(tokens)
    hd, hp = models.embed(dense_model, tokens), models.embed(pruned_model, tokens)
    context = dense_model.block_context(tokens.shape[1])
    rows = []
    for b, (dense_block, pruned_block) in enumerate(zip(dense_model.blocks, pruned_model.blocks)):
        hd, hp = dense_block.forward(hd, context)[0], pruned_block.forward(hp, context)[0]
        error = np.asarray((hd - hp) ** 2, np.float64)  # (N, T, d)
        target = np.asarray(hd, np.float64) ** 2
        by_channel_t, by_channel_e = target.sum((0, 1)), error.sum((0, 1))
        top = np.argsort(by_channel_t)[::-1][:3]
        rows.append({
            "block": b,
            "relative error": float(error.sum() / target.sum()),
            "first position's share of target": target[:, 0].sum() / target.sum(),
            "first position's share of error": _share(error[:, 0].sum(), error.sum()),
            "relative error without first position": error[:, 1:].sum() / target[:, 1:].sum(),
            "top-3 channels' share of target": by_channel_t[top].sum() / by_channel_t.sum(),
            "top-3 channels' share of error": _share(by_channel_e[top].sum(), by_channel_e.sum()),
            "top-3 channels": " ".join(str(int(c)) for c in top),
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pruned", help="a pruned model folder (or any model of the dense model's shapes)")
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--calib", nargs="+", default=None,
                        help="calibration text (default: five Austen novels, Persuasion held out, as the quality table)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "block_error_profile"))
    args = parser.parse_args(argv)
    command = "python benchmarks/block_error_profile.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    calib = args.calib or calibration_books()
    dense = models.load_model(args.dense, dtype="float32")
    pruned = models.load_model(args.pruned, dtype="float32", tokenizer=False)
    tokens = calibration_tokens(dense.tokenizer, load_documents(calib), args.nsamples, args.seqlen, args.seed)
    rows = profile(dense.model, pruned.model, tokens)
    seconds = time.perf_counter() - started
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps({"command": command, "seconds": seconds, "rows": rows}, indent=1))
    table = format_table({f"{r['block'] + 1}/{len(rows)} (model.layers.{r['block']})": {k: v for k, v in r.items() if k != "block"}
                          for r in rows}, digits=4, first="block")
    text = "\n".join([
        f"# Block-output error of `{pathlib.Path(args.pruned).name}` against `{args.dense}`", "",
        f"Produced on {platform.machine()} ({jax.default_backend()}), jax {jax.__version__}, in {seconds:.0f} s by:", "",
        f"- `{command}`", "",
        f"{args.nsamples} calibration windows × {args.seqlen} tokens (seed {args.seed}). Each block's output on the "
        "pruned model's own inputs is compared with the dense block's on the dense inputs: the loss `--recover` "
        "minimises. Shares are of the sums over windows, positions and channels; the top-3 channels are those of "
        "largest target energy in that block.", "",
        table, ""])
    atomic_write(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
