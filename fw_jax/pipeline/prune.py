"""Prune a whole model, block by block: ``prune_model(loaded, tokens, settings) -> PruneReport``.

Sequential pruning (docs/design.md §15): the calibration tokens are embedded; for each decoder block
the Gram matrix of every distinct linear input is accumulated, every linear layer is pruned by
the chosen method, the pruned weights are written back, and the *pruned* block produces the next
block's inputs. Embeddings and the LM head are never pruned.

With ``work_dir`` every finished block is checkpointed: its shard of the output
(``block_0003.safetensors``, every tensor of the block in the dtype it is written in) and its
layer records with the shard's SHA-256, each written atomically. Running again with the same
settings resumes after the last finished block: the inputs of the next block are recomputed by
running the saved blocks again, which is deterministic, so a resumed run gives the same model
bit for bit as an uninterrupted one (the pruned weights are rounded to the output dtype before
they feed the next block, in both). A saved block is used only if it is the very file that was
written (its record and shard match their checksums, and what is read back is the block's
tensors, finite); one that fails is pruned again with every later block, and the message names
its file. A streamed model (``load_model(..., stream=True)``) has one block in memory at
a time: it is read before it is pruned and dropped once its shard is written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fw_jax import _progress, models
from fw_jax._files import atomic_write
from fw_jax.solver import NM, Budget, PerRow, SolverOptions, inputs_error, reconstruct, saliency_mask, saliency_scores, weights_error

from . import distributed
from .checkpoints import (
    Damage as _Damage, ResumeMismatch, block_file as _block_file, blocks_on_disk as _blocks_on_disk,
    discard_blocks as _discard_blocks, finished_blocks as _finished_blocks, load_block_history as _load_block_history,
    load_block_records as _load_block_records, save_block as _save_block, verified_blocks as _verified_blocks,
)
from .identity import calibration_record, run_fingerprint, run_record as _run_record
from .methods import METHODS, Layer
from .allocation import Allocation, allocate
from .recover import RecoverSettings, recover_block

__all__ = ["METHODS", "PruneInterrupted", "PruneSettings", "PruneReport", "ResumeMismatch", "check_model",
           "prune_layer", "prune_model", "run_fingerprint"]

HIDDEN_DTYPES = ("float32", "bfloat16")  #: what calibration hidden states may be kept in between blocks
WARM_STARTS = ("wanda", "ria", "magnitude")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """How to prune every linear layer.

    Attributes:
      method: a name in :data:`~fw_jax.pipeline.methods.METHODS`. ``sparsefw`` is
        :func:`fw_jax.solve_layer`; ``sparsefw-published`` the published recipe (α = 0.9,
        2000 open-loop iterations).
      sparsity: fraction of each row pruned (ignored when ``pattern`` is set).
      pattern: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs (2:4 keeps 2).
      warm_start, alpha, tol: the arguments of :func:`fw_jax.solve_layer` (``tol``: stop a row
        once its relaxed certificate ``gap / error`` is below it); ``options`` its
        :class:`~fw_jax.SolverOptions` (``history`` is set per layer by the pipeline).
        Only methods that read them accept values other than the defaults.
      reconstruct: after the mask, refit the kept weights (``fw_jax.solver.reconstruct``).
      recover: after every block's masks (and reconstruction), tune the block's kept weights to
        reproduce the dense block's output (:mod:`fw_jax.pipeline.recover`); ``None``: off.
      allocation: a sparsity per block under the same total (:mod:`fw_jax.pipeline.allocation`:
        OWL's outlier ratios or the blocks' Wanda errors); ``None``: ``sparsity`` in every
        layer. Per-row sparsity only (not with ``pattern``).
      shrinkage: ``ρ ∈ [0, 1]``; every step that fits the calibration Gram matrix (the
        ``sparsefw`` mask, SparseGPT, reconstruction) uses it shrunk toward its diagonal,
        ``(1 − ρ) G + ρ diag(G)`` (as covariance estimators shrink toward a diagonal target).
        ρ = 0 is the calibration error itself; ρ = 1 makes the mask problem separable, where
        Wanda's mask is optimal, and reconstruction a no-op. It trusts the calibration text's
        cross-channel correlations less, for text unlike it. The diagonal is unchanged, so
        Wanda, RIA and magnitude masks are too. ``None`` (the default) means 0.5 for
        ``sparsefw`` (chosen by perplexity in results/quality.md) and 0 for every other method,
        so the baselines run as published. Errors, the lower bound and the certificate are
        always reported for the unshrunk ``G`` (the shrunk problem's as ``shrunk_*``).
      certify_iter: ``sparsefw`` only. With entries fixed (α > 0) or a shrunk Gram matrix, the
        solve's own lower bound on ``G`` is weak (often 0, a certificate of 1). This many plain
        Frank-Wolfe iterations (α = 0, on ``G``) started from the chosen mask prove a better
        bound; the mask is not changed. On a real SmolLM2 block 50 iterations add about half
        the solve time and give a mean certificate of 0.56–0.67 (results/certify.md; the
        relaxation's integrality gap is most of it).
    """

    method: str = "sparsefw"
    sparsity: float = 0.5
    pattern: Optional[tuple[int, int]] = None
    warm_start: str = "wanda"
    alpha: float = 0.9  # chosen by perplexity out of the calibration's domain (results/quality.md)
    tol: float = 1e-4
    options: SolverOptions = SolverOptions()
    reconstruct: bool = False
    recover: Optional[RecoverSettings] = None
    allocation: Optional[Allocation] = None
    shrinkage: Optional[float] = None
    certify_iter: int = 0

    @property
    def effective_shrinkage(self) -> float:
        """``shrinkage`` with ``None`` resolved: the method's default (0.5 for ``sparsefw``, else 0)."""
        if self.shrinkage is not None:
            return float(self.shrinkage)
        return METHODS[self.method].default_shrinkage

    @property
    def compares_with_wanda(self) -> bool:
        """Whether a layer's error can differ from Wanda's: not for Wanda's own mask with its
        weights kept (``method="wanda"`` without ``reconstruct``), where the comparison is empty."""
        return self.method != "wanda" or self.reconstruct

    def record(self) -> dict:
        """The settings as JSON-ready fields, ``shrinkage`` resolved (reports, fingerprints)."""
        record = {**dataclasses.asdict(self), "shrinkage": self.effective_shrinkage,
                  "options": dataclasses.asdict(self.options)}
        if self.recover is not None:
            record["recover"] = self.recover.record()
        return record

    def fitted_gram(self, gram):
        """The Gram matrix every fitting step uses: ``(1 − ρ) G + ρ diag(G)`` (``G`` when ρ = 0)."""
        rho = self.effective_shrinkage
        return gram if rho == 0 else (1 - rho) * gram + rho * jnp.diag(jnp.diag(gram))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.options, SolverOptions):
            raise ValueError(f"options must be a fw_jax.SolverOptions, got {self.options!r}")
        if self.recover is not None and not isinstance(self.recover, RecoverSettings):
            raise ValueError(f"recover must be None or a fw_jax.pipeline.RecoverSettings, got {self.recover!r}")
        if self.allocation is not None and not isinstance(self.allocation, Allocation):
            raise ValueError(f"allocation must be None or a fw_jax.pipeline.Allocation, got {self.allocation!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] (the fraction of each budget fixed to the top "
                             f"saliency weights), got {self.alpha}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number ≥ 0, got {self.tol}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}; got {self.warm_start!r}")
        if isinstance(self.certify_iter, bool) or not (isinstance(self.certify_iter, int) and self.certify_iter >= 0):
            raise ValueError(f"certify_iter must be an integer ≥ 0, got {self.certify_iter!r}")
        if self.shrinkage is not None and not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        unused = [f for f in _SOLVER_FIELDS if f not in METHODS[self.method].uses
                  and getattr(self, f) != _DEFAULTS[f]]
        if unused:
            raise ValueError(f"method {self.method} does not use {', '.join(unused)} (it would be ignored); "
                             + ("it is the published recipe, α = 0.9 from a Wanda warm start, as is"
                                if self.method == "sparsefw-published" else "those are sparsefw's"))
        if self.pattern is None and not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = self.pattern
            if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
                raise ValueError(f"pattern must be (n, m) with 1 ≤ n ≤ m (n kept of every m), got {self.pattern}")
            if self.allocation is not None:
                raise ValueError(f"allocation gives blocks different per-row sparsities; an n:m pattern "
                                 f"({n}:{m}) fixes every group's count: use sparsity, or no allocation")
        elif self.allocation is not None:
            self.allocation.check(self.sparsity)

    def budget(self, d_in: int) -> Budget:
        """The budget of a layer with ``d_in`` inputs."""
        if self.pattern is not None:
            return NM(*self.pattern)
        return PerRow(max(1, int(round(d_in * (1.0 - self.sparsity)))))

    def describe(self) -> str:
        target = f"{self.pattern[0]}:{self.pattern[1]} (keep {self.pattern[0]} of every {self.pattern[1]})" if self.pattern else f"{self.sparsity:.0%} per row"
        if self.allocation is not None:
            target += f" on average ({self.allocation.method} allocation, ±{self.allocation.lam:g})"
        return (f"{self.method}, {target}" + (" + reconstruction" if self.reconstruct else "")
                + (" + recovery" + self.recover.describe() if self.recover else ""))


_SOLVER_FIELDS = ("warm_start", "alpha", "tol", "options", "certify_iter")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruneSettings)}


@dataclasses.dataclass
class PruneReport:
    """What :func:`prune_model` did: one record per layer, plus totals."""

    settings: PruneSettings
    layers: list[dict]
    seconds: float  #: wall time of all blocks, including those of earlier runs it resumed
    calibration: dict
    history: Optional[dict] = None
    resumed_blocks: int = 0  #: blocks taken from an interrupted run's checkpoints
    allocation: Optional[dict] = None  #: with ``settings.allocation``: its scores, block sparsities, budgets

    def to_json(self) -> dict:
        return {
            "settings": self.settings.record(),
            "calibration": self.calibration,
            "seconds": self.seconds,
            "resumed_blocks": self.resumed_blocks,
            "processes": distributed.process_count(),  # the samples and layers were shared out
            "layers": self.layers,
            "summary": self.summary(),
        } | ({"allocation": self.allocation} if self.allocation is not None else {})

    def summary(self) -> dict:
        errors = np.array([r["error"] for r in self.layers])
        wanda = np.array([r["wanda_error"] for r in self.layers])
        ratio = np.where(wanda > 0, errors / np.where(wanda > 0, wanda, 1), 1.0)
        return {
            "layers": len(self.layers),
            "mean_error_vs_wanda": float(ratio.mean()) if len(ratio) else None,
            "mean_error_reduction_vs_wanda": float(1 - ratio.mean()) if len(ratio) else None,
            "kept_fraction": float(sum(r["kept"] for r in self.layers) / max(1, sum(r["size"] for r in self.layers))),
        }


def prune_layer(weight, gram, settings: PruneSettings, *, history: bool = False,
                inputs=None, budget: Optional[Budget] = None) -> tuple[jax.Array, dict]:
    """Prune one ``(d_out, d_in)`` layer given its input Gram matrix.

    ``budget``: this layer's own budget (an allocation's), instead of ``settings.budget(d_in)``.

    ``inputs``: the layer's ``(n, d_in)`` calibration inputs, when there are fewer tokens than
    inputs (``n < d_in``); the reported errors are then computed from them, at
    ``2·d_out·d_in·n`` operations each instead of ``2·d_out·d_in²`` (the masks do not change).

    Returns:
      The new weights (pruned entries exactly 0) and a record with the errors
      ``‖WX − ŴX‖²`` of the method and of Wanda, and, for ``sparsefw``, the warm-start error,
      the proved lower bound, the certificate, iterations and swaps.
    """
    weight = jnp.asarray(weight, jnp.float32)
    gram = jnp.asarray(gram, jnp.float32)
    budget = settings.budget(weight.shape[1]) if budget is None else budget
    if inputs is not None:
        inputs = jnp.asarray(inputs, jnp.float32)
        error_of = lambda new: float(inputs_error(weight, inputs, new))  # noqa: E731
    else:
        error_of = lambda new: float(weights_error(weight, gram, new))  # noqa: E731
    mask_error_of = lambda mask: error_of(jnp.where(mask, weight, 0))  # noqa: E731
    start = time.perf_counter()
    target = settings.fitted_gram(gram)  # the Gram matrix the method fits; errors below are always for ``gram``
    pruned = METHODS[settings.method].prune(Layer(weight, gram, target, budget, settings, history, mask_error_of))
    record: dict[str, Any] = dict(pruned.record or {})
    mask, new_weight = pruned.mask, pruned.weight
    mask = jnp.asarray(mask, bool)
    if settings.reconstruct:
        new_weight = reconstruct(weight, target, mask)
        record["mask_error"] = mask_error_of(mask)
    elif new_weight is None:  # else the method has updated the kept weights (SparseGPT)
        new_weight = jnp.where(mask, weight, 0)
    new_weight = jnp.where(mask, new_weight, 0).astype(jnp.float32)
    error = error_of(new_weight)
    if settings.compares_with_wanda:  # else the method's mask is Wanda's: one error product, not two
        wanda = saliency_mask(saliency_scores("wanda", weight, gram), budget)
        wanda_error = mask_error_of(wanda)
    else:
        wanda_error = error
    record.update(
        error=error,
        wanda_error=wanda_error,
        kept=int(jnp.sum(mask)),
        size=int(mask.size),
        seconds=time.perf_counter() - start,
    )
    return new_weight, record


class PruneInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`prune_model`: ``blocks_done`` blocks are saved in ``work_dir``."""

    def __init__(self, blocks_done: int, blocks: int, work_dir: Optional[str]):
        super().__init__(f"stopped after {blocks_done} of {blocks} blocks")
        self.blocks_done, self.blocks, self.work_dir = blocks_done, blocks, work_dir


def _max_positions(config) -> Optional[int]:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_model(loaded, settings: PruneSettings, seqlen: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``settings`` can prune every linear layer of ``loaded`` (each
    layer's budget fits its shape: an n:m pattern must divide its inputs) and ``seqlen`` fits the
    model's positions. Reads shapes only; run before anything is written."""
    model = loaded.model
    for b in range(models.num_blocks(model)):
        for layer in models.block_linears(model, b):
            d_out, d_in = layer.weight.shape
            try:
                settings.budget(d_in).check(d_out, d_in)
            except ValueError as e:
                raise ValueError(f"layer {layer.name} ({d_out}×{d_in}): {e}") from e
    limit = _max_positions(loaded.config)
    if seqlen is not None and limit and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} is longer than the model supports ({limit} positions): "
                         f"use --seqlen {limit} or less")


def _prune_named(name: str, weight, gram, settings: PruneSettings, history: bool, inputs=None, budget=None):
    """:func:`prune_layer`, with the layer's name in any ``ValueError`` it raises."""
    try:
        return prune_layer(weight, gram, settings, history=history, inputs=inputs, budget=budget)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from e


class _PrunedBlock(NamedTuple):
    """What :func:`_prune_block` returns (the new weights are in the model)."""

    records: list  # one record per layer
    history: Optional[dict]  # the Frank-Wolfe history of ``history_layer`` if it is in the block
    calibration_seconds: float  # the time its Gram matrices took
    energies: dict  # {layer name: diag(G), (d_in,)}: each input channel's energy, for recovery's dense pull


def _prune_block(loaded, b: int, hidden, settings: PruneSettings, history_layer, devices, progress, compare: bool,
                 budgets: Optional[Sequence[int]] = None) -> _PrunedBlock:
    """Prune the linear layers of block ``b`` given its calibration inputs ``hidden`` (layer
    ``i`` keeping ``budgets[i]`` per row when an allocation gives them) and write the
    new weights into the model (rounded to the dtype they will be saved in, when ``loaded.dtype``
    asks for one, so the next block is calibrated on the model as written)."""
    model = loaded.model
    calibration_start = time.perf_counter()
    linears = list(models.block_linears(model, b))
    # With fewer tokens than a layer has inputs, its errors are cheaper from the inputs themselves
    # (in one process: across processes each holds only its share of the tokens).
    few_tokens = distributed.process_count() == 1 and int(np.prod(hidden.shape[:2])) < min(
        layer.weight.shape[1] for layer in linears)
    # Chunk by chunk, summed exactly over chunks and processes: the same matrices in any number of processes
    grams = distributed.block_grams(model, b, hidden, return_inputs=few_tokens)
    grams, inputs = grams if few_tokens else (grams, {})
    jax.block_until_ready(grams)
    calibration_seconds = time.perf_counter() - calibration_start
    wants = [history_layer == layer.name and settings.method == "sparsefw" for layer in linears]
    layer_budgets = ([settings.budget(layer.weight.shape[1]) for layer in linears] if budgets is None
                     else [PerRow(int(k)) for k in budgets])

    def solve(i, device=None):
        layer = linears[i]
        w, g, x = layer.weight, grams[layer.input_key], inputs.get(layer.input_key)
        if device is not None:
            w, g = jax.device_put(w, device), jax.device_put(g, device)
            x = None if x is None else jax.device_put(x, device)
        new_weight, record = _prune_named(layer.name, w, g, settings, wants[i], x, layer_budgets[i])
        return (new_weight if device is None else jax.device_put(new_weight, jax.local_devices()[0])), record

    mine = [i for i in range(len(linears)) if distributed.owner(i) == distributed.process_index()]
    if devices is not None and len(devices) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
            solved = dict(zip(mine, pool.map(lambda i: solve(i, devices[i % len(devices)]), mine)))
        results = distributed.share_results(solved, [layer.weight.shape for layer in linears])
    elif distributed.process_count() > 1:
        results = distributed.share_results({i: solve(i) for i in mine}, [layer.weight.shape for layer in linears])
    else:
        results = (solve(i) for i in range(len(linears)))  # lazily: the progress bar follows the layers
    new_weights, records, history = {}, [], None
    with progress.steps(len(linears), f"block {b}", unit="layer", leave=False) as steps:
        for layer, want_history, budget, (new_weight, record) in zip(linears, wants, layer_budgets, results):
            if want_history:
                history = dict(record.pop("_history"), layer=layer.name)
            record = dict(name=layer.name, block=b, shape=list(layer.weight.shape), budget=str(budget),
                          method=settings.method, **record)
            record["sparsity"] = 1 - record["kept"] / record["size"]
            if loaded.dtype is not None:
                new_weight = models.round_to(new_weight, loaded.output_dtype(layer.name + ".weight"))
            new_weights[layer.name] = new_weight
            records.append(record)
            progress.say(_layer_line(record, compare), _progress.VERBOSE)
            steps.advance(note=layer.name.rsplit(".", 1)[-1])
    models.set_linear_weights(model, new_weights)
    energies = {layer.name: jnp.diagonal(grams[layer.input_key]) for layer in linears}
    return _PrunedBlock(records, history, calibration_seconds, energies)


def _not_used(damage, work_dir: str, b: int, writer: bool, progress: _progress.Progress) -> None:
    """Block ``b``'s checkpoint failed its check (``damage``): discard it and every later block's
    (computed from it), so that they are pruned again, and say so naming the file."""
    distributed.barrier("damaged checkpoint found")  # every process has read what it needs
    later = _discard_blocks(work_dir, b) if writer else 0
    also = f", with the checkpoints of the {later} later blocks (computed from it)," if later else ""
    progress.say(f"warning: {damage}. It is not used: this checkpoint{also} was discarded, and block {b} "
                 "and every later block are pruned again")


def _recover(loaded, b: int, hidden, target, settings: RecoverSettings, dense: Optional[dict]) -> dict:
    """Recovery of block ``b`` (``recover.recover_block``), its weights then rounded to the dtype
    they are written in, as pruned ones are."""
    record = recover_block(loaded.model, b, hidden, target, settings, dense)
    if loaded.dtype is not None and record["stopped"] not in ("worse", "nonfinite"):
        for layer in models.block_linears(loaded.model, b):
            models.set_linear_weight(loaded.model, layer.name,
                                     models.round_to(layer.weight, loaded.output_dtype(layer.name + ".weight")))
    return record


def _recovery_line(b: int, r: dict) -> str:
    why = {"steps": "", "early": ", stopped early (held-out loss)",
           "worse": ": no better, the block keeps its pruned weights",
           "nonfinite": ": a loss was not finite, the block keeps its pruned weights"}[r["stopped"]]
    return (f"block {b} recovery: loss vs dense {r['loss_before']:.4g} -> {r['loss_after']:.4g} "
            f"in {r['steps']} steps, {r['seconds']:.1f}s{why}")


def _layer_line(record: dict, compare: bool) -> str:
    """The ``-v`` line of one pruned layer."""
    line = f"  {record['name']:<36} {record['seconds']:6.1f}s  error {record['error']:.4g}"
    if compare:  # signed as in the plots: positive is a lower error than Wanda's
        reduction = 1 - record["error"] / record["wanda_error"] if record["wanda_error"] > 0 else 0.0
        line += f"  reduction vs Wanda {reduction:+.1%}"
    if "certificate" in record:  # a bound ≤ 0 proves nothing: say so rather than "cert 1.00"
        line += f"  cert {record['certificate']:.2f}" if record["lower_bound"] > 0 else "  cert -"
    return line


def _block_line(b: int, records: list[dict], seconds: float, compare: bool, calibration_seconds: float) -> str:
    """The one-line summary of a pruned block (the default progress output)."""
    line = (f"block {b}: {len(records)} layers in {seconds:.1f}s "
            f"(calibration passes {calibration_seconds:.1f}s)")
    if compare:  # signed as in the plots: positive is a lower error than Wanda's
        ratios = [r["error"] / r["wanda_error"] for r in records if r["wanda_error"] > 0]
        if ratios:
            line += f", error reduction vs Wanda {1 - float(np.mean(ratios)):+.1%} (mean over layers)"
    if records and "certificate" in records[0]:
        proved = [r["certificate"] for r in records if r["lower_bound"] > 0]
        line += (f", bound proved for {len(proved)}/{len(records)} layers (mean cert {np.mean(proved):.2f})"
                 if proved else ", no bound proved")
    return line


def prune_model(
    loaded,
    tokens: np.ndarray,
    settings: PruneSettings,
    *,
    work_dir: Optional[str] = None,
    calibration: Optional[dict] = None,
    history_layer: Optional[str] = None,
    progress: bool | _progress.Progress = True,
    after_block: Optional[Callable[[int], None]] = None,
    devices: Optional[Sequence[Any]] = None,
    hidden_dtype: str = "float32",
) -> PruneReport:
    """Prune every linear layer of every decoder block of ``loaded`` (in place).

    Args:
      loaded: a :class:`fw_jax.models.LoadedModel`.
      tokens: ``(nsamples, seqlen)`` calibration token ids.
      settings: the method and its options.
      work_dir: folder for per-block checkpoints (each block's output shard); with one, an
        interrupted run resumes. Needed for a streamed model, whose pruned blocks live only there.
      calibration: a description of the calibration data, recorded in the report and used to
        check that a resumed run is the same run.
      history_layer: name of a layer whose Frank-Wolfe history is recorded (for a plot).
      progress: report to stderr: a bar over the blocks on a terminal, a summary line per block
        (error reduction vs Wanda, certificates), a line per layer at ``VERBOSE``; a
        :class:`fw_jax.pipeline.Progress` chooses where and how much, ``False`` is silent.
      after_block: called with the block index after each block is finished and saved.
      devices: JAX devices to spread the layers of a block over (layer ``i`` on
        ``devices[i % len(devices)]``, solved concurrently); ``None`` solves them one by one on
        the default device. The result does not depend on it.
      hidden_dtype: ``"float32"`` or ``"bfloat16"``: the dtype the calibration hidden states are
        kept in between blocks (bfloat16 halves them; every block still computes in float32).

    Returns:
      A :class:`PruneReport`.
    """
    report = _progress.as_progress(progress)
    with _progress.use(report), _progress.interruptible(report):  # Ctrl-C stops between layers
        return _prune_blocks(loaded, tokens, settings, work_dir, calibration, history_layer, report,
                             after_block, devices, hidden_dtype)


def _prune_blocks(loaded, tokens, settings: PruneSettings, work_dir, calibration, history_layer,
                  progress: _progress.Progress, after_block, devices, hidden_dtype) -> PruneReport:
    model = loaded.model
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}; got {hidden_dtype!r}")
    keep = jnp.dtype(hidden_dtype)
    calibration = calibration_record(calibration, tokens.shape, hidden_dtype)
    check_model(loaded, settings, int(tokens.shape[1]))
    if loaded.streamed and work_dir is None:
        raise ValueError(f"{loaded.source} is streamed (load_model(..., stream=True)): each pruned block "
                         "leaves memory once done, so prune_model needs work_dir to write it to")
    record = _run_record(loaded, settings, calibration, tokens)
    fingerprint = run_fingerprint(loaded, settings, calibration, tokens)
    blocks = models.num_blocks(model)
    start_block = 0
    records: list[dict] = []
    earlier_seconds = 0.0  # wall time of the blocks an interrupted run finished
    writer = distributed.is_writer()  # across processes, only process 0 writes
    saved: list[tuple[list[dict], float]] = []  # the records and wall time of each block to resume
    if work_dir is not None:
        damage = None
        if os.path.isdir(work_dir):
            start_block = _finished_blocks(work_dir, record)  # checked before anything is written
            start_block, damage = _verified_blocks(work_dir, start_block)  # a damaged block is pruned again
        distributed.barrier("checkpoints read")  # nobody reads a state.json being replaced
        from fw_jax.pipeline.output import PARTIAL, read_marker, write_marker

        if writer:
            os.makedirs(work_dir, exist_ok=True)
            if read_marker(work_dir) is None:
                write_marker(work_dir, PARTIAL, describe=settings.describe())
            atomic_write(
                os.path.join(work_dir, "state.json"),
                json.dumps({"fingerprint": fingerprint, "describe": settings.describe(), "blocks": blocks,
                            "run": record}, default=str),
            )
        if damage is not None:
            _not_used(damage, work_dir, start_block, writer, progress)
        saved = [_load_block_records(work_dir, b) for b in range(start_block)]
        if start_block:
            progress.say(f"resuming after block {start_block - 1} from {work_dir}")

    if settings.method == "sparsefw" and settings.certify_iter == 0 and (
            settings.alpha > 0 or settings.effective_shrinkage > 0):
        progress.say("note: with fixed entries (α > 0) or shrinkage the solve's own lower bound on G is weak "
             "(cert - when it proves nothing); --certify N adds N plain Frank-Wolfe iterations for one")
    started = time.perf_counter()
    history = None
    done = start_block  # blocks finished (and saved, with a work_dir)
    compare = settings.compares_with_wanda
    if settings.recover is not None and distributed.process_count() > 1:
        raise ValueError("recover runs in one process (its gradients are not shared across processes yet)")
    try:
        hidden = models.embed(model, jnp.asarray(distributed.local_samples(tokens))).astype(keep)
        dense = hidden if settings.recover is not None else None  # the dense model's hidden states
        models.unload_rest(loaded)  # streamed: only the blocks are needed from here on
        allocation = None
        if settings.allocation is not None:  # a dense pass first (again on resume: it is deterministic)
            allocation = allocate(loaded, hidden, settings.allocation, settings.sparsity, progress)
            per_block = np.asarray(allocation["block_sparsity"])
            progress.say(f"allocation ({settings.allocation.method}): block sparsities {per_block.min():.3f} to "
                         f"{per_block.max():.3f}; the same weights kept in all as uniform {settings.sparsity:g}")
        if start_block:
            with progress.steps(start_block, "replaying the finished blocks", unit="block") as steps:
                for replayed in range(start_block):  # the pruned block as saved, read back
                    path = _block_file(work_dir, replayed)
                    try:  # its checksum matched: this can only fail if fw_jax wrote a bad block
                        pruned_block = models.read_block_shard(loaded, path, replayed)
                    except models.CheckpointError as e:
                        _not_used(_Damage(path, f"fw_jax's checkpoint of block {replayed} of this run (not the "
                                                f"input model) cannot be used: {e.problem}"),
                                  work_dir, replayed, writer, progress)
                        start_block, saved = replayed, saved[:replayed]
                        break
                    if dense is not None:  # the dense block first, as the original checkpoint has it
                        models.load_block(loaded, replayed)
                        dense = models.run_block(model, replayed, dense).astype(keep)
                    models.load_block(loaded, replayed, pruned_block)
                    del pruned_block
                    hidden = models.run_block(model, replayed, hidden).astype(keep)
                    models.unload_block(loaded, replayed)
                    steps.advance()
        for block_records, block_seconds in saved:
            records.extend(block_records)
            earlier_seconds += block_seconds
        for b in range(start_block):  # a history recorded before the interruption
            history = _load_block_history(work_dir, b) or history
        done = start_block
        with progress.steps(blocks, "pruning", unit="block", running_lines=False) as block_steps:
            block_steps.advance(start_block)
            forward_seconds = 0.0  # the pass through the previous block that computed this block's inputs
            for b in range(start_block, blocks):
                block_start = time.perf_counter() - forward_seconds  # that pass counts as this block's calibration
                models.load_block(loaded, b)
                target = None if dense is None else models.run_block(model, b, dense).astype(keep)
                pulled = ({layer.name: layer.weight for layer in models.block_linears(model, b)}
                          if target is not None and settings.recover.dense_pull else None)  # the dense weights
                pruned = _prune_block(loaded, b, hidden, settings, history_layer, devices, progress, compare,
                                      None if allocation is None else allocation["budgets"][b])
                block_records, calibration_seconds = pruned.records, pruned.calibration_seconds + forward_seconds
                for r in block_records:  # for blocks.png, whose times then add up to the run's
                    r["block_calibration_seconds"] = calibration_seconds
                history = pruned.history or history
                if target is not None:
                    recovery = _recover(loaded, b, hidden, target, settings.recover, None if pulled is None else {
                        name: (weight, pruned.energies[name]) for name, weight in pulled.items()})
                    for r in block_records:
                        r["block_recovery"] = recovery
                    progress.say(_recovery_line(b, recovery))
                    dense = target
                if work_dir is not None and writer:
                    _save_block(work_dir, b, loaded, block_records, time.perf_counter() - block_start, pruned.history)
                records.extend(block_records)
                done = b + 1
                block_seconds = time.perf_counter() - block_start
                if b + 1 < blocks:
                    forward_start = time.perf_counter()
                    hidden = jax.block_until_ready(models.run_block(model, b, hidden).astype(keep))
                    forward_seconds = time.perf_counter() - forward_start
                models.unload_block(loaded, b)
                now = time.perf_counter()
                left = (now - started) / (done - start_block) * (blocks - done)
                progress.say(_block_line(b, block_records, block_seconds, compare, calibration_seconds)
                             + (f"; {done} of {blocks} blocks done, about {left:.0f}s left" if done < blocks else ""))
                if after_block is not None:
                    after_block(b)
                block_steps.advance(note=f"block {b}")  # where a pending Ctrl-C stops the run
    except KeyboardInterrupt:
        if work_dir is not None:  # what is on disk counts: the block being saved may have made it
            done = _blocks_on_disk(work_dir, done)
        raise PruneInterrupted(done, blocks, work_dir) from None
    return PruneReport(settings=settings, layers=records, seconds=earlier_seconds + time.perf_counter() - started,
                       calibration=calibration, history=history, resumed_blocks=start_block, allocation=allocation)
