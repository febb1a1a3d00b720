"""Prune a whole model, block by block: ``prune_model(model, samples, settings) -> PruneReport``.

Sequential pruning (docs/design.md §15): the calibration samples go through the model's first
blocks; for each block the Gram matrix of every distinct linear input is accumulated, every
linear layer is pruned by the chosen method, the pruned weights are written back, and the
*pruned* block produces the next block's inputs. Embeddings and the LM head are never pruned.

The engine is the loop in :func:`_prune_blocks`; each step of a block is a function below it
(:func:`_prune_one_block`: calibrate and prune its layers, recover, save, advance). A model is
anything with the :class:`fw_jax.models.Blocks` methods: a :class:`~fw_jax.models.LoadedModel`
(wrapped in :class:`~fw_jax.models.LoadedBlocks`) or another front-end. Resuming lives in
``resume.py``, recovery in ``recover.py`` (:class:`~fw_jax.pipeline.recover.Recovery`), the
allocation of sparsities in ``allocation.py``, what is shared across processes in
``distributed.py``.

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
import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fw_jax import _progress, models
from fw_jax._files import atomic_write  # noqa: F401  (re-exported by fw_jax.pipeline)
from fw_jax.solver import Budget, PerRow, inputs_error, reconstruct, saliency_mask, saliency_scores, weights_error

from . import distributed, resume
from .allocation import allocate
from .checkpoints import ResumeMismatch, blocks_on_disk, save_block
from .identity import calibration_record, run_fingerprint, run_record
from .methods import METHODS, Layer
from .recover import Recovery
from .settings import HIDDEN_DTYPES, PruneSettings

__all__ = ["METHODS", "PruneInterrupted", "PruneSettings", "PruneReport", "ResumeMismatch", "check_model",
           "prune_layer", "prune_model", "run_fingerprint"]


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
    #: ``fw_jax.prune``: ``{parameter: why}`` for those used with the activations but not pruned
    left_dense: Optional[dict] = None

    def to_json(self) -> dict:
        return {
            "settings": self.settings.record(),
            "calibration": self.calibration,
            "seconds": self.seconds,
            "resumed_blocks": self.resumed_blocks,
            "processes": distributed.process_count(),  # the samples and layers were shared out
            "layers": self.layers,
            "summary": self.summary(),
        } | ({"allocation": self.allocation} if self.allocation is not None else {}) | (
            {"left_dense": self.left_dense} if self.left_dense is not None else {})

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
      ``‖WX − ŴX‖²`` of the method and of Wanda, and what the method reports (for ``sparsefw``
      the warm-start error, the proved lower bound, the certificate, iterations and swaps).
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
    wanda = functools.cache(lambda: saliency_mask(saliency_scores("wanda", weight, gram), budget))
    pruned = settings.method.prune(Layer(weight, gram, target, budget, settings.effective_shrinkage, history,
                                         mask_error_of, wanda))
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
        wanda_error = mask_error_of(wanda())
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


def check_model(model, settings: PruneSettings, seqlen: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``settings`` can prune every linear layer of ``model`` (a
    :class:`~fw_jax.models.LoadedModel` or :class:`~fw_jax.models.Blocks`: each layer's budget
    fits its shape, an n:m pattern must divide its inputs) and ``seqlen`` fits the model's
    positions. Reads shapes only; run before anything is written."""
    blocks = models.as_blocks(model)
    for b in range(len(blocks)):
        for layer in blocks.linears(b):
            d_out, d_in = layer.weight.shape
            try:
                settings.budget(d_in).check(d_out, d_in)
            except ValueError as e:
                raise ValueError(f"layer {layer.name} ({d_out}×{d_in}): {e}") from e
    limit = getattr(blocks, "max_positions", None)
    if seqlen is not None and limit and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} is longer than the model supports ({limit} positions): "
                         f"use --seqlen {limit} or less")


def _prune_named(name: str, weight, gram, settings: PruneSettings, history: bool, inputs=None, budget=None):
    """:func:`prune_layer`, with the layer's name in any ``ValueError`` it raises."""
    try:
        return prune_layer(weight, gram, settings, history=history, inputs=inputs, budget=budget)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from e


def _save_block(work_dir: str, b: int, blocks, records: list[dict], seconds: float, history) -> None:
    """Checkpoint block ``b`` (``checkpoints.save_block``); one name for tests to stop a run at."""
    save_block(work_dir, b, blocks, records, seconds, history)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One :func:`prune_model` call: what every step of the engine reads."""

    blocks: Any  # a fw_jax.models.Blocks
    settings: PruneSettings
    work_dir: Optional[str]
    history_layer: Optional[str]
    devices: Optional[Sequence[Any]]
    progress: _progress.Progress
    after_block: Optional[Callable[[int], None]]

    @property
    def compare(self) -> bool:
        return self.settings.compares_with_wanda


class _PrunedBlock(NamedTuple):
    """What :func:`_prune_layers` returns (the new weights are in the model)."""

    records: list  # one record per layer
    history: Optional[dict]  # the Frank-Wolfe history of ``history_layer`` if it is in the block
    calibration_seconds: float  # the time its Gram matrices took
    energies: dict  # {layer name: diag(G), (d_in,)}: each input channel's energy, for recovery's dense pull


def _calibrate(blocks, b: int, hidden, linears):
    """Block ``b``'s Gram matrices, and its inputs too when there are fewer tokens than a layer
    has inputs (its errors are cheaper from them; in one process only, as each process holds
    only its share of the tokens): ``(grams, inputs, seconds)``."""
    start = time.perf_counter()
    count = blocks.token_count(hidden) if hasattr(blocks, "token_count") else None
    few_tokens = (count is not None and distributed.process_count() == 1
                  and count < min(layer.weight.shape[1] for layer in linears))
    grams = blocks.grams(b, hidden, return_inputs=few_tokens)
    grams, inputs = grams if few_tokens else (grams, {})
    jax.block_until_ready(grams)
    return grams, inputs, time.perf_counter() - start


def _solve_layers(job: _Job, linears, grams, inputs, wants, budgets):
    """``(new weight, record)`` of every layer in order: one by one, over local devices, or
    shared out across processes (``distributed.share_results``)."""
    def solve(i, device=None):
        layer = linears[i]
        w, g, x = layer.weight, grams[layer.input_key], inputs.get(layer.input_key)
        if device is not None:
            w, g = jax.device_put(w, device), jax.device_put(g, device)
            x = None if x is None else jax.device_put(x, device)
        new_weight, record = _prune_named(layer.name, w, g, job.settings, wants[i], x, budgets[i])
        return (new_weight if device is None else jax.device_put(new_weight, jax.local_devices()[0])), record

    shapes = [layer.weight.shape for layer in linears]
    mine = [i for i in range(len(linears)) if distributed.owner(i) == distributed.process_index()]
    if job.devices is not None and len(job.devices) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(job.devices)) as pool:
            solved = dict(zip(mine, pool.map(lambda i: solve(i, job.devices[i % len(job.devices)]), mine)))
        return distributed.share_results(solved, shapes)
    if distributed.process_count() > 1:
        return distributed.share_results({i: solve(i) for i in mine}, shapes)
    return (solve(i) for i in range(len(linears)))  # lazily: the progress bar follows the layers


def _prune_layers(job: _Job, b: int, hidden, budgets: Optional[Sequence[int]]) -> _PrunedBlock:
    """Prune the linear layers of block ``b`` given its calibration inputs ``hidden`` (layer
    ``i`` keeping ``budgets[i]`` per row when an allocation gives them) and write the new
    weights into the model."""
    blocks, settings, progress = job.blocks, job.settings, job.progress
    linears = list(blocks.linears(b))
    grams, inputs, calibration_seconds = _calibrate(blocks, b, hidden, linears)
    wants = [job.history_layer == layer.name and settings.method.records_history for layer in linears]
    layer_budgets = ([settings.budget(layer.weight.shape[1]) for layer in linears] if budgets is None
                     else [PerRow(int(k)) for k in budgets])
    results = _solve_layers(job, linears, grams, inputs, wants, layer_budgets)
    new_weights, records, history = {}, [], None
    with progress.steps(len(linears), f"block {b}", unit="layer", leave=False) as steps:
        for layer, want_history, budget, (new_weight, record) in zip(linears, wants, layer_budgets, results):
            if want_history:
                history = dict(record.pop("_history"), layer=layer.name)
            record = dict(name=layer.name, block=b, shape=list(layer.weight.shape), budget=str(budget),
                          method=settings.method.name, **record)
            record["sparsity"] = 1 - record["kept"] / record["size"]
            new_weights[layer.name] = new_weight
            records.append(record)
            progress.say(_layer_line(record, job.compare), _progress.VERBOSE)
            steps.advance(note=layer.name.rsplit(".", 1)[-1])
    blocks.set_weights(b, new_weights)
    _note_layers(b, blocks, records, progress)
    energies = {layer.name: jnp.diagonal(grams[layer.input_key]) for layer in linears}
    return _PrunedBlock(records, history, calibration_seconds, energies)


def _note_layers(b: int, blocks, records: list[dict], progress) -> None:
    """Add what the front-end knows of each layer (its ``layer_notes``: an expert's routed
    ``tokens``, its ``fallback`` when too few were routed to it) to the records, and name the
    layers pruned on a fallback."""
    notes = blocks.layer_notes(b) if hasattr(blocks, "layer_notes") else {}
    for record in records:
        record.update(notes.get(record["name"], {}))
    fallen = [r for r in records if "fallback" in r]
    if fallen:
        progress.say(f"block {b}: {len(fallen)} expert layers had too few calibration tokens routed to them and "
                     "were pruned on a fallback: " + "; ".join(f"{r['name']} ({r['tokens']} tokens): {r['fallback']}"
                                                              for r in fallen))


def _prune_one_block(job: _Job, b: int, hidden, forward_seconds: float, recovery: Optional[Recovery],
                     budgets) -> tuple[Any, float, list, Optional[dict], float, float]:
    """Calibrate, prune, recover and save block ``b``, then run it (pruned) for block ``b + 1``:
    ``(next hidden, its forward seconds, records, history, block seconds, calibration seconds)``."""
    blocks = job.blocks
    block_start = time.perf_counter() - forward_seconds  # the pass that computed its inputs counts as its calibration
    with blocks.resident(b):
        before = None if recovery is None else recovery.before(b)  # while the block is dense
        pruned = _prune_layers(job, b, hidden, budgets)
        records, calibration_seconds = pruned.records, pruned.calibration_seconds + forward_seconds
        for r in records:  # for blocks.png, whose times then add up to the run's
            r["block_calibration_seconds"] = calibration_seconds
        if recovery is not None:
            recovery.after(b, hidden, before, pruned.energies, records, job.progress)
        if job.work_dir is not None and distributed.is_writer():  # across processes, only process 0 writes
            _save_block(job.work_dir, b, blocks, records, time.perf_counter() - block_start, pruned.history)
        block_seconds = time.perf_counter() - block_start
        forward_seconds = 0.0
        if b + 1 < len(blocks):
            forward_start = time.perf_counter()
            hidden = jax.block_until_ready(blocks.run(b, hidden))
            forward_seconds = time.perf_counter() - forward_start
    return hidden, forward_seconds, records, pruned.history, block_seconds, calibration_seconds


def _allocate(job: _Job, hidden) -> Optional[dict]:
    """The block sparsities of ``settings.allocation`` (a dense pass over the blocks first; again
    on resume, as it is deterministic), or ``None``."""
    settings = job.settings
    if settings.allocation is None:
        return None
    allocation = allocate(job.blocks, hidden, settings.allocation, settings.sparsity, job.progress)
    per_block = np.asarray(allocation["block_sparsity"])
    job.progress.say(f"allocation ({settings.allocation.method}): block sparsities {per_block.min():.3f} to "
                     f"{per_block.max():.3f}; the same weights kept in all as uniform {settings.sparsity:g}")
    return allocation


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
    model,
    samples,
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
    """Prune every linear layer of every block of ``model`` (in place).

    Args:
      model: a :class:`fw_jax.models.LoadedModel`, or any :class:`fw_jax.models.Blocks`.
      samples: calibration samples: ``(nsamples, seqlen)`` token ids for a ``LoadedModel``;
        what the front-end's ``first_inputs`` takes otherwise.
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
      hidden_dtype: ``"float32"`` or ``"bfloat16"``: the dtype a ``LoadedModel``'s calibration
        hidden states are kept in between blocks (bfloat16 halves them; every block still
        computes in float32).

    Returns:
      A :class:`PruneReport`.
    """
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}; got {hidden_dtype!r}")
    report = _progress.as_progress(progress)
    job = _Job(models.as_blocks(model, hidden_dtype), settings, work_dir, history_layer, devices, report, after_block)
    shape = np.shape(samples) if isinstance(samples, np.ndarray) or hasattr(samples, "shape") else None
    calibration = calibration_record(calibration, shape, hidden_dtype) if shape else dict(calibration or {})
    with _progress.use(report), _progress.interruptible(report):  # Ctrl-C stops between layers
        return _prune_blocks(job, samples, calibration)


def _open(job: _Job, samples, calibration: dict) -> resume.Resumed:
    """Checks before anything is written, then the checkpoints of an earlier run of this one."""
    blocks, settings = job.blocks, job.settings
    check_model(blocks, settings, int(samples.shape[1]) if hasattr(samples, "shape") else None)
    if getattr(blocks, "streamed", False) and job.work_dir is None:
        raise ValueError(f"{blocks.source} is streamed (load_model(..., stream=True)): each pruned block "
                         "leaves memory once done, so prune_model needs work_dir to write it to")
    if job.work_dir is None:
        return resume.Resumed()
    if not hasattr(blocks, "write_shard"):
        raise ValueError(f"work_dir checkpoints a model's blocks as shards of its checkpoint; {blocks.source} "
                         "has none (prune it without work_dir)")
    record = run_record(blocks, settings, calibration, samples)
    return resume.open_run(job.work_dir, record, settings.describe(), len(blocks), job.progress)


def _prune_blocks(job: _Job, samples, calibration: dict) -> PruneReport:
    """The engine: compute block 0's inputs, open the run, replay what an earlier run finished,
    then prune the blocks left one by one."""
    blocks, settings, progress = job.blocks, job.settings, job.progress
    # Block 0's inputs first: a traced front-end (fw_jax.prune) finds its layers from them.
    hidden = blocks.first_inputs(distributed.local_samples(samples) if hasattr(samples, "shape") else samples)
    resumed = _open(job, samples, calibration)
    recovery = None if settings.recover is None else Recovery(blocks, settings.recover)
    note = settings.method.note(settings.effective_shrinkage)
    if note:
        progress.say(note)
    started, count = time.perf_counter(), len(blocks)
    records, history, done = list(resumed.records), resumed.history, resumed.start
    try:
        if recovery is not None:
            recovery.start(hidden)
        allocation = _allocate(job, hidden)
        if job.work_dir is not None:
            hidden, resumed = resume.replay(blocks, job.work_dir, resumed, hidden, recovery, progress)
            records, history, done = list(resumed.records), resumed.history, resumed.start
        with progress.steps(count, "pruning", unit="block", running_lines=False) as block_steps:
            block_steps.advance(done)
            forward_seconds = 0.0  # the pass through the previous block that computed this block's inputs
            for b in range(resumed.start, count):
                hidden, forward_seconds, block_records, block_history, seconds, calibration_seconds = (
                    _prune_one_block(job, b, hidden, forward_seconds, recovery,
                                     None if allocation is None else allocation["budgets"][b]))
                records.extend(block_records)
                history = block_history or history
                done = b + 1
                left = (time.perf_counter() - started) / (done - resumed.start) * (count - done)
                progress.say(_block_line(b, block_records, seconds, job.compare, calibration_seconds)
                             + (f"; {done} of {count} blocks done, about {left:.0f}s left" if done < count else ""))
                if job.after_block is not None:
                    job.after_block(b)
                block_steps.advance(note=f"block {b}")  # where a pending Ctrl-C stops the run
    except KeyboardInterrupt:
        if job.work_dir is not None:  # what is on disk counts: the block being saved may have made it
            done = blocks_on_disk(job.work_dir, done)
        raise PruneInterrupted(done, count, job.work_dir) from None
    return PruneReport(settings=settings, layers=records, seconds=resumed.seconds + time.perf_counter() - started,
                       calibration=calibration, history=history, resumed_blocks=resumed.start, allocation=allocation)
