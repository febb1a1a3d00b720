"""Where the time of one LLaMA-2-7B-shaped block goes under ``sparsefw`` defaults.

``results/scale.md`` measured a 7B-shaped block with ``sparsefw --max-iter 5`` at about 1,230 s,
several times what five Frank-Wolfe iterations cost. This script takes one block of
``bench_scale``'s random bfloat16 checkpoint (block 0; the engine's streamed loading and its
calibration on ``--nsamples × --seqlen`` tokens of ``pydoc-calib``) and times every step the
pipeline takes for it, each by calling the functions the pipeline calls on the same inputs:

* per block: reading the block, the Gram matrices (``prune._calibrate``, i.e. ``block_grams``
  with the inputs), writing the pruned weights back and saving the block (``save_block``), the
  forward pass that makes the next block's inputs;
* per layer, in ``prune_layer``'s order: the shrunk Gram matrix, the input checks and the PSD
  checks (``solve_layer`` and ``mask_lower_bound`` each check their matrix), then the parts of
  the compiled ``_solve`` each jitted on its own (warm start, Frank-Wolfe, rounding, row errors,
  1-swaps, lower bounds), the lower bound on ``G``, the errors for the report and the Wanda
  comparison;
* the whole ``prune_layer`` call, as the pipeline makes it (defaults except ``max_iter``), its
  compile time taken out with JAX's own compile-time events, so that the phases can be checked
  to add up to it (the gap is reported, and whether the phases gave the very same mask).

Compile time is excluded everywhere (the jitted parts are compiled ahead of time, the others
get a warm-up call) and reported apart. Times are medians of up to ``--repeats`` calls, one call
where a call took more than ``--long-call`` seconds. Frank-Wolfe: per iteration
``(t(B) − t(A)) / (B − A)`` for ``A = --max-iter``, ``B = --more-iter``; fixed costs ``t(0)``;
the default 100 iterations are *extrapolated* (fixed + 100 × per iteration + the one dense
refresh at t = 64), with the iteration's FLOP rate against a plain GEMM of the same shape timed
in the same run. Every phase after the loop is timed on the mask of ``A`` iterations.

    python benchmarks/profile_block.py        # the 7B-shaped block (105 min on 2 busy cores)
    python benchmarks/profile_block.py --tiny --results /tmp/p.json   # seconds: the tests' run
    python benchmarks/profile_block.py --render   # rewrite the markdown from the saved JSON

Results: a key in ``results/scale.json`` (the rest kept) and a section at the end of
``results/scale.md`` (replaced if there, else appended; the rest kept).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scale import make_checkpoint, with_section  # noqa: E402
from fw_jax import models  # noqa: E402
from fw_jax.pipeline import PruneSettings, SparseFW, atomic_write  # noqa: E402
from fw_jax.pipeline.checkpoints import save_block  # noqa: E402
from fw_jax.pipeline.methods.sparsefw import history_every  # noqa: E402
from fw_jax.pipeline.data import calibration_tokens, load_documents, needs_bos_per_window  # noqa: E402
from fw_jax.pipeline.prune import _calibrate, prune_layer  # noqa: E402
from fw_jax.solver import SolverOptions, inputs_error, saliency_mask, saliency_scores, weights_error  # noqa: E402
from fw_jax.solver._frank_wolfe import frank_wolfe, full_polytope_bound, gram_matmul  # noqa: E402
from fw_jax.solver._psd import check_gram_psd  # noqa: E402
from fw_jax.solver._solve import _mask_lower_bound, _residual_product  # noqa: E402
from fw_jax.solver._steps import as_step_rule  # noqa: E402
from fw_jax.solver._validation import check_layer_inputs  # noqa: E402

TITLES = {"7b": "## Where a 7B-shaped block's time goes (sparsefw defaults)",
          "tiny": "## Where a tiny block's time goes (sparsefw defaults; the tests' run)"}
KEYS = {"7b": "profile_block", "tiny": "profile_block_tiny"}
DEFAULT_ITER = SolverOptions().max_iter  # what the table extrapolates to

# The table's rows, in the pipeline's order: (key, label, where it happens). "fw_iterations" is
# extrapolated; every other row is measured.
ROWS = [
    ("read_block", "read the block from the checkpoint (streamed)", "block"),
    ("calibration", "calibration: Gram matrices and inputs (`block_grams`)", "block"),
    ("shrink", "shrunk Gram matrix (ρ = 0.5)", "layer"),
    ("input_checks", "input checks: finite, symmetric (2 per layer)", "layer"),
    ("psd_checks", "PSD checks, Lanczos (2 per layer)", "layer"),
    ("warm_start", "warm start: Wanda mask (also the comparison's) and fixed entries (2 per-row selections)", "layer"),
    ("fw_fixed", "Frank-Wolfe fixed costs (3 GEMMs, final oracle)", "layer"),
    ("fw_iterations", "Frank-Wolfe iterations (extrapolated)", "layer"),
    ("rounding", "rounding (a 3-key per-row selection)", "layer"),
    ("row_errors", "row errors in the solve (2 GEMMs: warm and rounded masks)", "layer"),
    ("swaps", "1-swaps (and the final mask's product)", "layer"),
    ("solve_bounds", "lower bounds in the solve (2 full-polytope bounds, from products already there)", "layer"),
    ("bound_on_G", "lower bound on G (`mask_lower_bound`)", "layer"),
    ("report_errors", "errors for the report (from the inputs)", "layer"),
    ("wanda", "Wanda comparison (an error: the mask is the warm start's)", "layer"),
    ("save", "write back and save the block (shard, SHA-256, record)", "block"),
    ("forward", "forward pass for the next block's inputs", "block"),
]
# The rows outside the Frank-Wolfe loop, grouped for the reading, each with what would cut it (a
# suggestion, not measured here).
GROUPS = [
    ("1-swaps", ("swaps",),
     "steps only over the rows still improving (the loop runs until the last row stops, and rows that "
     "have stopped still pass through every step)"),
    ("the per-row selections (warm start, rounding, Wanda comparison)", ("warm_start", "rounding", "wanda"),
     None),
    ("the products outside the loop (its fixed costs, the row errors, the lower bounds in the solve and "
     "on G)", ("fw_fixed", "row_errors", "solve_bounds", "bound_on_G"),
     "products with the inputs X instead of G (G = XXᵀ, n ≪ d_in), and the bound on G from the solve's "
     "products (G and its shrinkage differ only on the diagonal)"),
    ("the checks (shrinking, input and PSD checks)", ("shrink", "input_checks", "psd_checks"),
     "one check per distinct Gram matrix (q, k, v share one, gate and up another) and none of the shrunk "
     "one, which is PSD whenever G is"),
    ("the block's own steps (reading, calibration, report errors, saving, forward pass)",
     ("read_block", "calibration", "report_errors", "save", "forward"), None),
]


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, summed from its monitoring events."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    _instance = None

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **_):
        if event in self.EVENTS:
            self.seconds += duration

    @classmethod
    def shared(cls) -> "CompileClock":
        if cls._instance is None:  # one listener per process: they cannot be removed
            cls._instance = cls()
        return cls._instance


class Timer:
    """Medians of warm calls, compile apart; every measurement logged to stderr."""

    def __init__(self, repeats: int, long_call: float):
        self.repeats, self.long_call = repeats, long_call
        self.clock = CompileClock.shared()
        self.compiled: dict = {}
        self.started = time.perf_counter()

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.0f}s] {text}", file=sys.stderr, flush=True)

    def _timed(self, call) -> tuple[float, int, object]:
        times, out = [], None
        while len(times) < self.repeats:
            start = time.perf_counter()
            out = jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
            if times[-1] > self.long_call:
                break
        return statistics.median(times), len(times), out

    def call(self, name: str, call) -> tuple[dict, object]:
        """``call()`` once to warm up (its compile time recorded), then timed."""
        before = self.clock.seconds
        jax.block_until_ready(call())
        compile_seconds = self.clock.seconds - before
        seconds, calls, out = self._timed(call)
        self.log(f"{name}: {seconds:.3f}s ({calls} calls)")
        return dict(seconds=seconds, calls=calls, compile_seconds=compile_seconds), out

    def jitted(self, name: str, fn, args: tuple, **static) -> tuple[dict, object]:
        """``fn(*args, **static)`` compiled ahead of time (once per shape and static arguments), then timed."""
        shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
        key = (fn.__name__, shapes, tuple(sorted((k, repr(v)) for k, v in static.items())))
        compile_seconds = 0.0
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = jax.jit(functools.partial(fn, **static)).lower(*args).compile()
            compile_seconds = time.perf_counter() - start
        executable = self.compiled[key]
        seconds, calls, out = self._timed(lambda: executable(*args))
        self.log(f"{name}: {seconds:.3f}s ({calls} calls)")
        return dict(seconds=seconds, calls=calls, compile_seconds=compile_seconds), out


# The parts of fw_jax.solver._solve._solve, each as it is written there.

def _warm_start(weight, gram, fitted, alpha, *, budget, saliency):
    # prune_layer's Wanda mask on G (the warm start and the report's comparison), then the solve's
    # symmetrised Gram matrix, scores and fixed entries
    warm = saliency_mask(saliency_scores("wanda", weight, gram), budget)
    gram = (fitted + fitted.T) / 2
    scores = saliency_scores(saliency, weight, gram)
    fixed = budget.round((warm, scores), count=budget.fixed_count(alpha)) & warm
    return gram, scores, warm, fixed


def _frank_wolfe(weight, gram, warm, fixed, scores, tol, *, budget, options, max_iter, history):
    dtype = weight.dtype
    step_rule = as_step_rule(options.step_rule)
    gram_norm = jnp.linalg.eigvalsh(gram)[-1] if getattr(step_rule, "needs_gram_norm", False) else jnp.ones((), dtype)
    round_units = None
    if history:
        def round_units(u):
            return budget.units(budget.round((fixed, budget.from_units(u), scores))).astype(dtype)
    return frank_wolfe(budget.units(weight), gram, budget.units(warm.astype(dtype)), budget.units(fixed),
                       budget.oracle(options.lmo_method), step_rule, max_iter=max_iter, tol=tol, gram_norm=gram_norm,
                       refresh_every=options.refresh_every, round_units=round_units, precision=options.precision)


def _rounding(fixed, relaxed_units, scores, *, budget):
    return budget.round((fixed, budget.from_units(relaxed_units), scores))


def _choose(weight, gram, warm, rounded, *, budget):
    warm_product, rounded_product = _residual_product(weight, gram, warm), _residual_product(weight, gram, rounded)
    warm_rows = jnp.sum(weight * ~warm * warm_product, axis=-1)
    rounded_rows = jnp.sum(weight * ~rounded * rounded_product, axis=-1)
    better = jnp.reshape(
        budget.rows_of_units(budget.unit_totals(rounded_rows) <= budget.unit_totals(warm_rows)), (-1, 1))
    return jnp.where(better, rounded, warm), jnp.where(better, rounded_product, warm_product)


def _swaps(weight, gram, mask, fixed, product, *, budget, options):
    refined = budget.refine(weight, gram, mask, fixed, options.max_swaps, refresh_every=options.refresh_every,
                            product=product)
    return refined.mask, refined.swaps, refined.product


def _final_rows(weight, mask, product):
    return jnp.sum(weight * ~mask * product, axis=-1)


def _solve_bounds(weight, residual, relaxed_units, fw_bound, fixed, mask, product, *, budget, options):
    lmo, units = budget.oracle(options.lmo_method), budget.units(weight)
    unit_has_fixed = jnp.any(budget.units(fixed).reshape(fw_bound.shape[0], -1), axis=-1)
    bounds = [full_polytope_bound(units, residual, relaxed_units, lmo),
              full_polytope_bound(units, budget.units(product), budget.units(mask.astype(weight.dtype)), lmo),
              jnp.where(unit_has_fixed, 0, fw_bound)]
    return jnp.sum(functools.reduce(jnp.maximum, bounds))


def _bound_on_gram(weight, gram, points, *, budget):
    return _mask_lower_bound(weight, gram, points, budget=budget, check_psd=False)


def _gemm(x, gram, *, precision):
    return gram_matmul(x, gram, precision)


def profile_layer(timer: Timer, name: str, weight, gram, inputs, settings: PruneSettings, more_iter: int,
                  history: bool) -> tuple[dict, jax.Array]:
    """Every phase of ``prune_layer`` on one layer, then the whole call: ``(record, new weight)``."""
    weight, gram = jnp.asarray(weight, jnp.float32), jnp.asarray(gram, jnp.float32)
    inputs = None if inputs is None else jnp.asarray(inputs, jnp.float32)  # errors from X when n < d_in
    method: SparseFW = settings.method
    options, budget = method.options, settings.budget(weight.shape[1])
    d_out, d_in = weight.shape
    short = name.rsplit(".", 1)[-1]
    phases, fw = {}, {}
    say = lambda phase: f"{short} {phase}"  # noqa: E731

    phases["shrink"], fitted = timer.call(say("shrunk Gram"), lambda: settings.fitted_gram(gram))
    for tag, matrix in (("fitted", fitted), ("G", gram)):  # solve_layer checks the first, mask_lower_bound the second
        phases[f"input_checks_{tag}"], _ = timer.call(
            say(f"input checks ({tag})"), lambda m=matrix: check_layer_inputs(weight, m, budget, psd=False)[1])
        phases[f"psd_check_{tag}"], _ = timer.call(say(f"PSD check ({tag})"), lambda m=matrix: check_gram_psd(m))
    alpha, tol = jnp.asarray(method.alpha, jnp.float32), jnp.asarray(method.tol, jnp.float32)
    phases["warm_start"], (sym, scores, warm, fixed) = timer.jitted(
        say("warm start"), _warm_start, (weight, gram, fitted, alpha), budget=budget, saliency=method.warm_start)
    loop = dict(budget=budget, options=options, history=False)
    fw_args = (weight, sym, warm, fixed, scores, tol)
    fw["t0"], _ = timer.jitted(say("FW 0 it"), _frank_wolfe, fw_args, max_iter=0, **loop)
    fw["tA"], result = timer.jitted(say(f"FW {options.max_iter} it"), _frank_wolfe, fw_args,
                                    max_iter=options.max_iter, **loop)
    fw["tB"], more = timer.jitted(say(f"FW {more_iter} it"), _frank_wolfe, fw_args, max_iter=more_iter, **loop)
    # The loop stops early once every row has converged: count what it ran (a row's count stops the
    # iteration before the one that found it converged).
    ran = {t: min(cap, int(jnp.max(out.iterations)) + 1) if cap else 0
           for t, cap, out in (("A", options.max_iter, result), ("B", more_iter, more))}
    del more
    fw["gemm"], _ = timer.jitted(say("GEMM"), _gemm, (weight, sym), precision=options.precision)
    if history:  # the CLI records the Frank-Wolfe history of the run's first layer
        loop["history"] = True
        fw["history_tA"], _ = timer.jitted(say("FW history A"), _frank_wolfe, fw_args, max_iter=options.max_iter,
                                           **loop)
        fw["history_tB"], _ = timer.jitted(say("FW history B"), _frank_wolfe, fw_args, max_iter=more_iter, **loop)
    phases["fw_chain"] = fw["tA"]
    phases["rounding"], rounded = timer.jitted(say("rounding"), _rounding, (fixed, result.relaxed_mask, scores),
                                               budget=budget)
    phases["choose"], (mask, product) = timer.jitted(say("row errors: warm, rounded"), _choose,
                                                     (weight, sym, warm, rounded), budget=budget)
    phases["swaps"], (mask, row_swaps, product) = timer.jitted(say("1-swaps"), _swaps,
                                                               (weight, sym, mask, fixed, product),
                                                               budget=budget, options=options)
    phases["final_rows"], _ = timer.jitted(say("row errors: final"), _final_rows, (weight, mask, product))
    phases["solve_bounds"], _ = timer.jitted(
        say("bounds in the solve"), _solve_bounds,
        (weight, result.residual, result.relaxed_mask, result.lower_bound, fixed, mask, product),
        budget=budget, options=options)
    del product
    relaxed = budget.from_units(result.relaxed_mask)
    phases["bound_on_G"], _ = timer.jitted(say("bound on G"), _bound_on_gram,
                                           (weight, gram, (relaxed, mask.astype(jnp.float32))), budget=budget)

    def error_of(new):  # prune_layer's: from the inputs when it has them, else from G
        return float(inputs_error(weight, inputs, new) if inputs is not None else weights_error(weight, gram, new))

    def report_errors(mask=mask):  # SparseFW.prune's mask error, then prune_layer's new weight, error and count
        error_of(jnp.where(mask, weight, 0))
        kept = jnp.asarray(mask, bool)
        new_weight = jnp.where(kept, jnp.where(kept, weight, 0), 0).astype(jnp.float32)
        error_of(new_weight)
        int(jnp.sum(kept))
        return new_weight

    def wanda():  # the error of the warm start's mask (prune_layer computes Wanda's mask once)
        return error_of(jnp.where(warm, weight, 0))

    phases["report_errors"], _ = timer.call(say("errors for the report"), report_errors)
    phases["wanda"], _ = timer.call(say("Wanda comparison"), wanda)
    chain_mask = np.asarray(mask)
    swaps = np.asarray(row_swaps)
    del sym, scores, warm, fixed, result, rounded, mask, relaxed, fitted

    before = timer.clock.seconds
    start = time.perf_counter()
    new_weight, record = prune_layer(weight, gram, settings, history=False, inputs=inputs, budget=budget)
    wall = time.perf_counter() - start
    whole = dict(wall_seconds=wall, compile_seconds=timer.clock.seconds - before)
    whole["seconds"] = wall - whole["compile_seconds"]
    timer.log(f"{short} prune_layer: {whole['seconds']:.3f}s (+ compile {whole['compile_seconds']:.1f}s)")
    kept = np.asarray(new_weight) != 0
    same_mask = bool(np.array_equal(kept, chain_mask & (np.asarray(weight) != 0)))

    if ran["B"] <= ran["A"]:
        raise SystemExit(f"{name}: every row converged within {ran['A']} iterations, so the time of one "
                         f"cannot be measured between {options.max_iter} and {more_iter}; lower --max-iter")
    per_iter = (fw["tB"]["seconds"] - fw["tA"]["seconds"]) / (ran["B"] - ran["A"])
    flops = 2.0 * d_out * d_in * d_in  # the iteration's one product (W ⊙ D) G
    fw.update(iterations_run=ran, per_iteration_seconds=per_iter, iteration_flops=flops,
              iteration_gflops_per_s=flops / per_iter / 1e9 if per_iter > 0 else None,
              gemm_gflops_per_s=flops / fw["gemm"]["seconds"] / 1e9)
    if history:
        fw["history_per_iteration_seconds"] = ((fw["history_tB"]["seconds"] - fw["history_tA"]["seconds"])
                                               / (ran["B"] - ran["A"]) - per_iter)
    chained = sum(p["seconds"] for p in phases.values())
    return dict(name=name, shape=[d_out, d_in], phases=phases, frank_wolfe=fw, prune_layer=whole,
                phases_seconds=chained, gap=(whole["seconds"] - chained) / whole["seconds"],
                same_mask_as_prune_layer=same_mask, swaps_total=int(swaps.sum()), swaps_max_per_row=int(swaps.max()),
                record={k: v for k, v in record.items() if k != "_history"},
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20), new_weight


def layer_rows(layer: dict, iterations: int) -> dict:
    """Seconds of the table's per-layer rows at ``iterations`` Frank-Wolfe iterations."""
    p, fw = layer["phases"], layer["frank_wolfe"]
    refreshes = (iterations - 1) // SolverOptions().refresh_every  # dense products at t = 64, 128, ...
    return {"shrink": p["shrink"]["seconds"],
            "input_checks": p["input_checks_fitted"]["seconds"] + p["input_checks_G"]["seconds"],
            "psd_checks": p["psd_check_fitted"]["seconds"] + p["psd_check_G"]["seconds"],
            "warm_start": p["warm_start"]["seconds"],
            "fw_fixed": fw["t0"]["seconds"],
            "fw_iterations": iterations * fw["per_iteration_seconds"] + refreshes * fw["gemm"]["seconds"],
            "rounding": p["rounding"]["seconds"],
            "row_errors": p["choose"]["seconds"] + p["final_rows"]["seconds"],
            "swaps": p["swaps"]["seconds"], "solve_bounds": p["solve_bounds"]["seconds"],
            "bound_on_G": p["bound_on_G"]["seconds"], "report_errors": p["report_errors"]["seconds"],
            "wanda": p["wanda"]["seconds"]}


def summarize(result: dict) -> dict:
    """The block's table at the default iterations: ``{row key: seconds}``, total, shares."""
    layers = [layer_rows(layer, DEFAULT_ITER) for layer in result["layers"]]
    seconds = {key: (result["block"][key]["seconds"] if where == "block" else sum(r[key] for r in layers))
               for key, _, where in ROWS}
    total = sum(seconds.values())
    return dict(iterations=DEFAULT_ITER, seconds=seconds, total=total,
                shares={k: v / total for k, v in seconds.items()})


def run(args) -> dict:
    shape = "tiny" if args.tiny else "7b"
    timer = Timer(args.repeats, args.long_call)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # the code measured: read before the hour of profiling
    load_at_start = os.getloadavg()[1]
    work = pathlib.Path(args.out)
    folder = make_checkpoint(work / f"{shape}-1block", shape, 1)
    loaded = models.load_model(str(folder), dtype="auto", stream=True)
    bos_id = loaded.tokenizer.bos_token_id if needs_bos_per_window(loaded) else None
    tokens = calibration_tokens(loaded.tokenizer, load_documents("pydoc-calib"), args.nsamples, args.seqlen, 0,
                                bos_id=bos_id, source="pydoc-calib")
    blocks = models.as_blocks(loaded)
    hidden = jax.block_until_ready(blocks.first_inputs(tokens))
    settings = PruneSettings(method=SparseFW(options=SolverOptions(max_iter=args.max_iter)))
    block = {}

    def read_block():
        with blocks.resident(0):
            pass

    block["read_block"], _ = timer.call("read the block", read_block)
    layers, new_weights = [], {}
    with blocks.resident(0):
        linears = list(blocks.linears(0))
        block["calibration"], (grams, inputs, _) = timer.call(
            "calibration", lambda: _calibrate(blocks, 0, hidden, linears)[:2] + (None,))
        for i, layer in enumerate(linears):
            record, new_weights[layer.name] = profile_layer(
                timer, layer.name, layer.weight, grams[layer.input_key], inputs.get(layer.input_key), settings,
                args.more_iter, history=(i == 0 and not args.no_history))
            layers.append(record)
        del grams, inputs
        save_dir = work / "save"
        save_dir.mkdir(parents=True, exist_ok=True)

        def save():
            blocks.set_weights(0, new_weights)
            save_block(str(save_dir), 0, blocks, [r["record"] for r in layers], 0.0, None)

        try:
            block["save"], _ = timer.call("write back and save", save)
        finally:
            shutil.rmtree(save_dir)
        block["forward"], _ = timer.call("forward", lambda: blocks.run(0, hidden))
    result = dict(
        command=shlex.join(["python", "benchmarks/profile_block.py", *args.argv]), date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.machine_note}".rstrip(", "),
        commit=commit, jax=jax.__version__, device=str(jax.devices()[0].platform),
        calibration=dict(source="pydoc-calib", nsamples=args.nsamples, seqlen=args.seqlen),
        settings=settings.record(), max_iter=args.max_iter, more_iter=args.more_iter, repeats=args.repeats,
        long_call_seconds=args.long_call, block=block, layers=layers,
        compile_seconds=dict(prune_layer=sum(r["prune_layer"]["compile_seconds"] for r in layers)),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        wall_seconds=time.perf_counter() - timer.started,
        load_average=dict(start=load_at_start, end=os.getloadavg()[1]))  # 5-minute averages: what else ran
    if layers and "history_per_iteration_seconds" in layers[0]["frank_wolfe"]:
        # what the CLI records: the rounded error every N-th iteration, each a rounding and a product
        every = history_every(DEFAULT_ITER)
        result["history_every"] = every
        result["history_seconds"] = (math.ceil(DEFAULT_ITER / every)
                                     * layers[0]["frank_wolfe"]["history_per_iteration_seconds"])
    result["summary"] = summarize(result)
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _sec(x: float) -> str:
    """Seconds to a readable precision, whether a tiny block's milliseconds or a 7B block's minutes."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.2g}"


def render(result: dict, title: str, before: dict | None = None) -> str:
    """The markdown section of one profile (``before``: an earlier profile, in two more columns)."""
    summary, n = result["summary"], result["summary"]["iterations"]
    s, shares = summary["seconds"], summary["shares"]
    labels = {key: label for key, label, _ in ROWS}
    labels["fw_iterations"] = (f"Frank-Wolfe iterations: {n} × measured per iteration + 1 dense refresh "
                               "(extrapolated)")
    m, b = result["max_iter"], result["more_iter"]
    lines = [title, "",
             f"`{result['command']}` on {result['machine']}, {result['date']} (fw_jax {result['commit']}, "
             f"jax {result['jax']}, {result['device']}; {result['wall_seconds'] / 60:.0f} min; 5-minute load average "
             f"{result['load_average']['start']:.1f} at the start, {result['load_average']['end']:.1f} at the end).",
             "",
             f"One block of `bench_scale.py`'s random LLaMA checkpoint (block 0), calibrated by the engine on "
             f"{result['calibration']['nsamples']} × {result['calibration']['seqlen']} tokens of pydoc-calib, pruned "
             f"by `sparsefw` with its defaults (α {result['settings']['alpha']}, "
             f"ρ {result['settings']['shrinkage']}, "
             f"exact line search, 1-swaps) at {n} iterations. Each phase calls the functions the pipeline calls on "
             f"the same inputs, the parts of the compiled solve each jitted on its own; compile time excluded; "
             f"medians of up to {result['repeats']} calls (one where a call took over "
             f"{result['long_call_seconds']:.0f} s). Frank-Wolfe: per iteration = (t({b} it) − t({m} it)) / {b - m} "
             f"(over the iterations run, where every row converged sooner), "
             f"fixed costs = t(0 it); the {n} iterations are that per-iteration time × {n}, not run. The phases "
             f"after the loop ran on the mask of {m} iterations.", "",
             "| phase | seconds | share of the block |" + (" before: seconds | before: share |" if before else ""),
             "|:--|--:|--:|" + ("--:|--:|" if before else "")]
    old = before["summary"] if before else None
    for key, _, _ in ROWS:
        lines.append(f"| {labels[key]} | {_sec(s[key])} | {_pct(shares[key])} |"
                     + (f" {_sec(old['seconds'][key])} | {_pct(old['shares'][key])} |" if old else ""))
    lines += [f"| **block** | **{_sec(summary['total'])}** | **100%** |"
              + (f" **{_sec(old['total'])}** | **100%** |" if old else ""), ""]
    if before:
        lines += [f"'Before': the same profile of fw_jax {before['commit']} ({before['date']}; "
                  f"{before['wall_seconds'] / 60:.0f} min; `{before['command']}`; 5-minute load average "
                  f"{before['load_average']['start']:.1f} at the start), kept in the JSON under "
                  f"`{KEYS[{v: k for k, v in TITLES.items()}[title]]}_before`.", ""]
    lines += ["Per layer (the whole `prune_layer` call at the CLI's defaults except "
              f"`max_iter = {m}`, compile taken out, against the sum of its phases; 'same mask': the phases "
              "chained gave the mask `prune_layer` gave; GFLOP/s of one iteration counts its one product "
              "(W ⊙ D)·G, against a plain float32 GEMM of that shape timed in the same run):", "",
             f"| layer | shape | prune_layer, {m} it (s) | phases (s) | gap | same mask | s/iteration | "
             f"s/iteration, (t({m}) − t(0))/{m} | iteration GFLOP/s | GEMM GFLOP/s | 1-swaps (s) | "
             "swaps (max per row) | PSD checks (s) | warm start + rounding + Wanda (s) |",
             "|:--|:--|--:|--:|--:|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for layer in result["layers"]:
        fw, rows = layer["frank_wolfe"], layer_rows(layer, n)
        rate = fw["iteration_gflops_per_s"]
        sorts = rows["warm_start"] + rows["rounding"] + rows["wanda"]
        ran = fw.get("iterations_run", {}).get("A", m)
        check = (fw["tA"]["seconds"] - fw["t0"]["seconds"]) / ran if ran else float("nan")
        lines.append(f"| {layer['name'].rsplit('.', 2)[-2] + '.' + layer['name'].rsplit('.', 1)[-1]} | "
                     f"{layer['shape'][0]}×{layer['shape'][1]} | {_sec(layer['prune_layer']['seconds'])} | "
                     f"{_sec(layer['phases_seconds'])} | {_pct(layer['gap'])} | "
                     f"{'yes' if layer['same_mask_as_prune_layer'] else 'no'} | {_sec(fw['per_iteration_seconds'])} | "
                     f"{_sec(check)} | {'-' if rate is None else format(rate, '.1f')} | "
                     f"{fw['gemm_gflops_per_s']:.1f} | {_sec(rows['swaps'])} | "
                     f"{layer['swaps_max_per_row']} | {_sec(rows['psd_checks'])} | {_sec(sorts)} |")
    whole = sum(layer["prune_layer"]["seconds"] for layer in result["layers"])
    chained = sum(layer["phases_seconds"] for layer in result["layers"])
    at_m = sum(sum(layer_rows(layer, m).values()) for layer in result["layers"])
    at_m += sum(result["block"][k]["seconds"] for k in result["block"])
    lines += ["", f"The {len(result['layers'])} `prune_layer` calls took {_sec(whole)} s, their phases "
              f"{_sec(chained)} s "
              f"(gap {_pct((whole - chained) / whole)}). At {m} iterations the whole block is {_sec(at_m)} s by these "
              f"phases. Not in the table: compilation, {_sec(result['compile_seconds']['prune_layer'])} s in the "
              "`prune_layer` calls (the first block of a run only, once per layer shape)"
              + (f"; the Frank-Wolfe history the CLI records for the run's first layer, "
                 f"{_sec(result['history_seconds'])} s at {n} iterations (once per run)" if "history_seconds" in result
                 else "")
              + f". Peak RSS of the profile: {result['peak_rss_gb']:.2f} GB.", "", reading(result), ""]
    return "\n".join(lines)


def reading(result: dict) -> str:
    """The paragraph that reads the table: what outside the loop weighs, and what would cut it."""
    summary, m = result["summary"], result["max_iter"]
    shares, n = summary["shares"], summary["iterations"]
    outside = sum(v for k, v in shares.items() if k != "fw_iterations")
    groups = [(name, sum(shares[k] for k in keys), cut) for name, keys, cut in GROUPS]
    text = (f"Reading: at {n} iterations the Frank-Wolfe iterations are {_pct(shares['fw_iterations'])} of the "
            f"block and everything outside the loop {_pct(outside)} ({_sec(outside * summary['total'])} s): "
            + ", ".join(f"{name} {_pct(share)}" for name, share, _ in groups) + ".")
    cuts = [f"{name.split(' (')[0]}: {cut}" for name, share, cut in sorted(groups, key=lambda g: -g[1])
            if cut and share >= 0.02]
    if cuts:
        text += " What would cut them (not measured here): " + "; ".join(cuts) + "."
    at_m = {}
    for layer in result["layers"]:
        for k, v in layer_rows(layer, m).items():
            at_m[k] = at_m.get(k, 0.0) + v
    at_m.update({k: v["seconds"] for k, v in result["block"].items()})
    total_m = sum(at_m.values())
    text += (f" At {m} iterations (what `bench_scale.py` ran) the same phases make {_sec(total_m)} s, the "
             f"Frank-Wolfe iterations {_pct(at_m['fw_iterations'] / total_m)} of it, "
             + ", ".join(f"{name.split(' (')[0]} {_pct(sum(at_m[k] for k in keys) / total_m)}"
                         for name, keys, _ in GROUPS) + ".")
    if "history_seconds" in result:
        every = result.get("history_every", 1)
        text += (f" Once per run, the Frank-Wolfe history the CLI records for the first layer (a rounding and a "
                 f"product {'per iteration' if every == 1 else f'every {every} iterations'}) adds "
                 f"{_sec(result['history_seconds'])} s at {n} iterations, "
                 f"{_pct(result['history_seconds'] / summary['total'])} of a block.")
    return text


def write_results(result: dict, shape: str, path: pathlib.Path, keep_as_before: bool = False) -> None:
    """Add ``result`` under its key of the JSON (the rest kept; with ``keep_as_before`` the profile
    it replaces moves to the 'before' key) and its section to the markdown beside it."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(existing, dict):
        raise SystemExit(f"{path} holds {type(existing).__name__}, not a JSON object of results; not overwriting it")
    key = KEYS[shape]
    if keep_as_before:
        if key not in existing:
            raise SystemExit(f"--keep-as-before: {path} has no {key!r} profile to keep")
        existing[key + "_before"] = existing[key]
    existing[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(existing, indent=1))
    markdown = path.with_suffix(".md")
    text = markdown.read_text() if markdown.exists() else ""
    before = existing.get(key + "_before")
    if before is not None:
        before["summary"] = summarize(before)
    atomic_write(markdown, with_section(text, TITLES[shape], render(result, TITLES[shape], before)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny block (seconds), for the tests")
    p.add_argument("--out", default=str(ROOT / "runs" / "profile_block"), help="where the checkpoint goes")
    p.add_argument("--results", default=str(ROOT / "results" / "scale.json"), help="JSON results (and .md beside it)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (4; tiny 2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sample (128; tiny 16)")
    p.add_argument("--max-iter", type=int, default=5, help="iterations of the whole prune_layer call and of the "
                   "mask the later phases work on")
    p.add_argument("--more-iter", type=int, default=None, help="a second iteration count, for the per-iteration "
                   "time (10; tiny 200)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per phase at most (3; tiny 5)")
    p.add_argument("--long-call", type=float, default=30.0, help="one timed call is enough above these seconds")
    p.add_argument("--no-history", action="store_true", help="skip timing the first layer's Frank-Wolfe history")
    p.add_argument("--machine-note", default="", help="added to the machine's description (other jobs, ...)")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the saved JSON")
    p.add_argument("--keep-as-before", action="store_true", help="move the profile saved for this shape to the "
                   "table's 'before' columns (and the JSON's '<key>_before') instead of dropping it")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    shape = "tiny" if args.tiny else "7b"
    results = pathlib.Path(args.results)
    if args.render:
        saved = json.loads(results.read_text()) if results.exists() else {}
        if KEYS[shape] not in saved:
            raise SystemExit(f"{results} has no {KEYS[shape]!r} profile to render; run the profile first")
        saved[KEYS[shape]]["summary"] = summarize(saved[KEYS[shape]])
        write_results(saved[KEYS[shape]], shape, results)
        return 0
    defaults = dict(nsamples=(2, 4), seqlen=(16, 128), more_iter=(200, 10), repeats=(5, 3))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if not 0 <= args.max_iter < args.more_iter:
        raise SystemExit(f"--more-iter ({args.more_iter}) must be above --max-iter ({args.max_iter}), both ≥ 0")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    saved = json.loads(results.read_text()) if results.exists() else {}
    if args.keep_as_before and KEYS[shape] not in saved:  # refused before an hour of profiling, not after
        raise SystemExit(f"--keep-as-before: {results} has no {KEYS[shape]!r} profile to keep")
    result = run(args)
    write_results(result, shape, results, keep_as_before=args.keep_as_before)
    print(render(result, TITLES[shape]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
