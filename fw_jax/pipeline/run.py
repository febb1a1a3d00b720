"""From a model name to a pruned checkpoint folder with its report and plots, resumable.

``prune_to_folder`` is what ``fw-jax prune`` runs: load the model and the calibration text, draw
the calibration windows, prune block by block (checkpointing into ``OUT.partial``), assemble the
Hugging Face folder, ``prune_report.json`` and PNG plots in a hidden temporary folder, rename it
to ``OUT`` in one step, and only then delete ``OUT.partial``. Killing the process at any point
and running the same command again finishes the job with the same result; what may be written,
replaced or deleted is decided in ``output.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any, Optional, Sequence, Union

from fw_jax import _progress, models
from fw_jax._checks import check_int
from fw_jax._files import atomic_write, replace_folder
from fw_jax.pipeline.data import calibration_tokens, load_documents, needs_bos_per_window
from fw_jax.pipeline.output import (
    FINISHED, MARKER_NAME, PARTIAL, OutputError, check_output, clean_stale_temporaries, lock_output, new_temporary,
    remove_own_folder, write_marker,
)
from fw_jax.pipeline import distributed
from fw_jax.pipeline.checkpoints import check_assembled
from fw_jax.pipeline.identity import calibration_record, digest, request_record, run_fingerprint
from fw_jax.pipeline.prune import PruneReport, PruneSettings, check_model, prune_model

__all__ = ["AlreadyPruned", "FORMATS", "prune_to_folder", "REPORT_NAME"]

REPORT_NAME = "prune_report.json"
FORMATS = tuple(models.WRITERS)  #: output formats: sharded safetensors, or a transformers 4.x Flax msgpack


def _write_plots(report: PruneReport, out_dir: str) -> list[str]:
    """``blocks.png`` always; ``error_reduction.png`` unless the run is Wanda's own masks (all
    zeros by construction); ``convergence.png`` when a layer's Frank-Wolfe history was recorded,
    every line of it on the matrix the solver fitted. Returns the paths written."""
    from fw_jax.pipeline.plots import plot_blocks, plot_convergence, plot_error_reduction

    settings, describe = report.settings, report.settings.describe()
    compare = settings.compares_with_wanda
    written = []
    if compare:
        written.append(plot_error_reduction(report.layers, os.path.join(out_dir, "error_reduction.png"),
                                            title=f"Layer error vs Wanda — {describe}"))
    written.append(plot_blocks(report.layers, os.path.join(out_dir, "blocks.png"),
                               title=f"Per block — {describe}", compare_wanda=compare))
    if report.history is not None:
        layer = report.history["layer"]
        history = {k: v for k, v in report.history.items() if k != "layer"}
        record = next(r for r in report.layers if r["name"] == layer)
        rho = settings.effective_shrinkage
        warm_start = getattr(settings.method, "warm_start", "wanda")
        warm = f"warm start ({warm_start})"
        if rho > 0:  # the history is of the shrunk problem: only its own numbers go on its axis
            matrix = "F = diag(G)" if rho == 1 else f"F = {1 - rho:g}·G + {rho:g}·diag(G)"
            references = {warm: record.get("shrunk_warm_error"), "lower bound": record.get("shrunk_lower_bound")}
            title = (f"Frank-Wolfe on {layer}\nsolved on F (shrinkage ρ = {rho:g}); "
                     f"the returned mask's\nerror on G is in prune_report.json")
        else:
            matrix = "G = XXᵀ"
            references = {warm: record.get("warm_error"), "lower bound": record.get("lower_bound"),
                          "returned mask": record.get("mask_error", record["error"])}
            if warm_start != "wanda":
                references["Wanda"] = record["wanda_error"]
            title = f"Frank-Wolfe on {layer}"
        references = {k: float(v) for k, v in references.items() if v is not None and float(v) > 0}  # proved only
        written.append(plot_convergence(history, os.path.join(out_dir, "convergence.png"), title=title,
                                        references=references, matrix=matrix))
    return written


def _claim(plan, held: contextlib.ExitStack) -> None:
    """Take the lock on ``plan.out_dir`` (the writing process only) and keep it in ``held``; in
    a run of several processes, if process 0 is refused every process stops with it."""
    refused = None
    if distributed.is_writer():
        try:
            held.enter_context(lock_output(plan))
        except OutputError as e:
            refused = e
    if distributed.process_count() > 1:
        import numpy as np

        votes = distributed.sum_over_processes({"refused": np.array([refused is not None], np.int32)})
        if int(votes["refused"][0]) and refused is None:
            raise OutputError(f"process 0 may not write {plan.out_dir} (its message says why); nothing was written")
    if refused is not None:
        raise refused


class AlreadyPruned(FileExistsError):
    """``OUT`` already holds the result of this very run (same model, settings and calibration):
    nothing to do. Leftovers of its finishing (if it was killed) have been cleaned up."""


def _check_counts(nsamples, seqlen, seed) -> tuple[int, int, int]:
    """The three counts as plain ints (numpy ints accepted), or ``ValueError`` naming the one that is not."""
    return check_int("nsamples", nsamples, 1), check_int("seqlen", seqlen, 1), check_int("seed", seed, 0)


def prune_to_folder(
    model: str,
    out_dir: str,
    settings: PruneSettings,
    *,
    calib: Union[str, Sequence[str]] = "pydoc-calib",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    dtype: str = "auto",
    format: Optional[str] = None,
    hidden_dtype: str = "float32",
    overwrite: bool = False,
    history_layer: Optional[str] = "auto",
    progress: bool | _progress.Progress = True,
    after_block=None,
    devices=None,
) -> tuple[models.LoadedModel, PruneReport]:
    """Prune ``model`` (a folder, a GGUF file or ``"smollm2-135m"``) into ``out_dir``.

    Everything is checked before anything is written (:mod:`fw_jax.pipeline.output`): the output
    folder (never the input, never a folder fw_jax did not write), the options, every layer's
    budget and ``seqlen`` against the model's positions. Blocks are checkpointed in
    ``OUT.partial``; the same call resumes there. The finished folder is assembled aside and
    renamed into place, then ``OUT.partial`` is removed.

    A Hugging Face folder is read a block at a time (``load_model(..., stream=True)``) and each
    pruned block is written at once as its shard of the output (in ``OUT.partial``, linked into
    ``OUT`` at the end), so memory holds the embeddings, the head and one block whatever the
    model's size. Every tensor is written in ``dtype``: ``"auto"`` keeps each one's own
    (bfloat16 stays bfloat16; a quantized GGUF's become bfloat16), or ``"float32"``,
    ``"bfloat16"``, ``"float16"``; the model is rounded to it when loaded, so what is pruned
    and calibrated on is what is written. ``format``: ``"hf"`` (sharded safetensors) or
    ``"flax"`` (``flax_model.msgpack``, float32, read whole); ``None``: the input's kind (Flax
    for a Flax folder, else Hugging Face).

    ``progress`` (see :func:`~fw_jax.pipeline.prune_model`) reports loading, every block and the
    saving to stderr.

    Returns the pruned model (its blocks are not in memory when streamed: read them from
    ``out_dir``) and the report.

    Raises:
      AlreadyPruned: ``out_dir`` holds this very run's result (a ``FileExistsError``).
      FileExistsError: ``out_dir`` holds another finished run and ``overwrite`` is false.
      OutputError, ResumeMismatch, DataError, CheckpointError (all ``ValueError``): what the
        message says; nothing was written. ``OutputBusy`` (an ``OutputError``): another process
        is writing ``out_dir`` (one run at a time holds its lock, ``.OUT.lock`` beside it).
      WriteError (an ``OSError``): the finished folder could not be written or put in place (the
        disk is full, read-only, ...); the message names it; the checkpoints are kept.
      PruneInterrupted: Ctrl-C while pruning; the finished blocks are saved.
    """
    command = _Command(model, out_dir, settings, calib, *_check_counts(nsamples, seqlen, seed), dtype,
                       format or _input_format(model), hidden_dtype, overwrite, history_layer, after_block, devices)
    with _progress.use(progress) as report_to, contextlib.ExitStack() as held:  # held: the output's lock
        return _prune_to_folder(command, report_to, held)


@dataclasses.dataclass(frozen=True)
class _Command:
    """The arguments of one :func:`prune_to_folder` call (counts checked, ``format`` resolved)."""

    model: str
    out_dir: str
    settings: PruneSettings
    calib: Union[str, Sequence[str]]
    nsamples: int
    seqlen: int
    seed: int
    dtype: str
    format: str
    hidden_dtype: str
    overwrite: bool
    history_layer: Optional[str]
    after_block: Any
    devices: Any

    def request(self, documents) -> str:
        """The digest of what this command asks for (:func:`~fw_jax.pipeline.identity.request_record`)."""
        return digest(request_record(self.model, self.settings, self.calib, documents, self.nsamples, self.seqlen,
                                     self.seed, self.dtype, self.format, self.hidden_dtype))


def _input_format(model: str) -> str:
    """``"flax"`` for a folder holding only a Flax msgpack, else ``"hf"``."""
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "flax_model.msgpack")) and not any(
            os.path.isfile(os.path.join(model, f)) for f in ("model.safetensors", models.INDEX_NAME)):
        return "flax"
    return "hf"


def _prune_to_folder(command: _Command, progress: _progress.Progress, held: contextlib.ExitStack):
    """Check and claim the output, load and calibrate, prune with checkpoints, publish, tidy up."""
    plan, documents, request = _check_and_claim(command, held)
    loaded, tokens, calibration, history_layer = _load_and_calibrate(command, documents)
    _prepare_work_dir(command, plan, loaded, tokens, calibration, request)
    progress.say(f"pruning {command.model}: {command.settings.describe()}, calibration "
                 f"{command.nsamples}×{command.seqlen} tokens of {command.calib}")
    report = prune_model(loaded, tokens, command.settings, work_dir=plan.work_dir, calibration=calibration,
                         history_layer=history_layer, progress=progress, after_block=command.after_block,
                         devices=command.devices, hidden_dtype=command.hidden_dtype)
    if distributed.is_writer():  # across processes, only process 0 writes
        _publish(command, plan, loaded, report, request, progress)
    distributed.barrier("output written")
    if loaded.streamed:  # its blocks are in OUT now: read them from there
        loaded = models.load_model(plan.out_dir, dtype=command.dtype, stream=True)
    return loaded, report


def _check_and_claim(command: _Command, held: contextlib.ExitStack):
    """Everything about the output checked and its lock taken, before anything is loaded:
    ``(plan, documents, request)``. Raises :class:`AlreadyPruned` when ``OUT`` holds this very
    run's result."""
    if command.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {command.format!r}")
    models.output_dtype("float32", command.dtype)  # a bad name is refused before anything is read
    plan = check_output(command.out_dir, command.model)
    _claim(plan, held)  # one run at a time per OUT, before anything is loaded
    documents = load_documents(command.calib)
    request = command.request(documents)
    same_run = plan.finished is not None and plan.finished.get("request") == request
    writer = distributed.is_writer()
    distributed.barrier("output checked")  # every process has seen the folders before any changes
    if writer and same_run and plan.partial is not None and plan.partial.get("request") == request:
        remove_own_folder(plan.work_dir)  # this very run finished earlier and was killed while tidying up
    for folder in (plan.out_dir, plan.work_dir) if writer else ():
        clean_stale_temporaries(folder)  # fw_jax's own leftovers of killed runs
    if same_run and not command.overwrite:
        raise AlreadyPruned(f"{command.out_dir} already holds this run's result (same model, settings and "
                            "calibration); nothing to do (--overwrite runs it again)")
    plan.check_replace(command.overwrite)
    return plan, documents, request


def _load_and_calibrate(command: _Command, documents):
    """The model (streamed for a Hugging Face output), checked against the settings, and its
    calibration tokens: ``(loaded, tokens, calibration record, history layer)``."""
    loaded = models.load_model(command.model, dtype=command.dtype, stream=command.format == "hf")  # a msgpack is written whole
    if loaded.tokenizer is None:
        raise ValueError(f"{command.model} has no tokenizer; calibration needs one")
    check_model(loaded, command.settings, command.seqlen)
    bos_id = getattr(loaded.tokenizer, "bos_token_id", None) if needs_bos_per_window(loaded) else None
    tokens = calibration_tokens(loaded.tokenizer, documents, command.nsamples, command.seqlen, command.seed,
                                bos_id=bos_id, source=str(command.calib))
    history_layer = command.history_layer
    if history_layer == "auto":
        history_layer = models.block_linears(loaded.model, 0)[0].name
    calib = command.calib
    calibration = {"source": calib if isinstance(calib, str) else list(calib), "seed": command.seed}
    return loaded, tokens, calibration, history_layer


def _prepare_work_dir(command: _Command, plan, loaded, tokens, calibration: dict, request: str) -> None:
    """``OUT.partial`` ready for this run: another run's checkpoints discarded when
    ``overwrite`` asks (this run's are kept, to resume), the folder made and marked."""
    work_dir, writer = plan.work_dir, distributed.is_writer()
    if plan.partial is not None and command.overwrite:  # discard another run's checkpoints, as asked
        try:
            with open(os.path.join(work_dir, "state.json")) as f:
                there = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            there = None
        full = calibration_record(calibration, tokens.shape, command.hidden_dtype)
        if there != run_fingerprint(loaded, command.settings, full, tokens) and writer:
            remove_own_folder(work_dir)
    if not os.path.isdir(work_dir) and writer:
        os.makedirs(work_dir)
        write_marker(work_dir, PARTIAL, describe=command.settings.describe(), request=request)
    distributed.barrier("checkpoint folder ready")


def _publish(command: _Command, plan, loaded, report: PruneReport, request: str, progress) -> None:
    """Assemble the finished folder aside (shards, checked; plots; report; marker), rename it
    into place, then remove ``OUT.partial``. An ``OSError`` becomes a ``WriteError`` naming the
    folder; the checkpoints are kept."""
    out, work_dir, settings = plan.out_dir, plan.work_dir, command.settings
    tmp = None
    try:
        tmp = new_temporary(out)
        shards = {b: os.path.join(work_dir, f"block_{b:04d}.safetensors") for b in range(models.num_blocks(loaded.model))}
        models.WRITERS[command.format](loaded, tmp, block_files=shards)
        if command.format == "hf":  # before it is marked finished: every tensor listed, every block as checkpointed
            check_assembled(loaded, tmp, work_dir)
        with progress.timed("writing the report's plots"):
            _write_plots(report, tmp)
        atomic_write(os.path.join(tmp, REPORT_NAME),
                     json.dumps(report.to_json() | {"model": command.model, "history": report.history}, indent=1))
        files = sorted(name for name in os.listdir(tmp) if name != MARKER_NAME)
        write_marker(tmp, FINISHED, describe=settings.describe(), request=request, files=files)
        replace_folder(tmp, out)  # what was there (empty, or fw_jax's as allowed above) goes
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, models.WriteError):
            raise models.WriteError(out, e) from e  # a clear message naming the folder, not a traceback
        raise
    try:
        remove_own_folder(work_dir)
    except OutputError as e:  # the model is published; only the tidying up is left
        progress.say(f"warning: the pruned model is saved in {out}, but {e}", _progress.QUIET)
