"""From a model name to a pruned checkpoint folder with its report and plots, resumable.

``prune_to_folder`` is what ``fw-jax prune`` runs: load the model and the calibration text, draw
the calibration windows, prune block by block (checkpointing into ``OUT.partial``), save a
Hugging Face folder atomically, write ``prune_report.json`` and PNG plots next to it, and only
then delete ``OUT.partial``. Killing the process at any point and running the same command
again finishes the job with the same result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional, Sequence, Union

from fw_jax import models
from fw_jax.pipeline.data import calibration_tokens, load_documents, needs_bos_per_window
from fw_jax.pipeline.prune import PruneReport, PruneSettings, prune_model

__all__ = ["prune_to_folder", "REPORT_NAME"]

REPORT_NAME = "prune_report.json"


def _write_plots(report: PruneReport, out_dir: str) -> list[str]:
    from fw_jax.pipeline.plots import plot_convergence, plot_error_reduction

    written = [plot_error_reduction(report.layers, os.path.join(out_dir, "error_reduction.png"),
                                    title=f"Layer error vs Wanda — {report.settings.describe()}")]
    if report.history is not None:
        history = {k: v for k, v in report.history.items() if k != "layer"}
        record = next(r for r in report.layers if r["name"] == report.history["layer"])
        references = {"Wanda": record["wanda_error"], "returned mask": record["error"],
                      "lower bound": record.get("lower_bound", 0.0)}
        written.append(plot_convergence(history, os.path.join(out_dir, "convergence.png"),
                                        title=f"Frank-Wolfe on {report.history['layer']}",
                                        references={k: v for k, v in references.items() if v > 0}))
    return written


def prune_to_folder(
    model: str,
    out_dir: str,
    settings: PruneSettings,
    *,
    calib: Union[str, Sequence[str]] = "pydoc-calib",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
    history_layer: Optional[str] = "auto",
    progress: bool = True,
    after_block=None,
    devices=None,
) -> tuple[models.LoadedModel, PruneReport]:
    """Prune ``model`` (a folder, a GGUF file or ``"smollm2-135m"``) into ``out_dir``.

    Returns the pruned model (in memory) and the report. Raises ``FileExistsError`` if
    ``out_dir`` already holds a finished checkpoint and ``overwrite`` is false. ``devices``: see
    :func:`prune_model` (the layers of a block solved concurrently, one per device).
    """
    if os.path.exists(os.path.join(out_dir, REPORT_NAME)) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a finished pruned model; pass --overwrite to replace it")
    work_dir = out_dir.rstrip("/") + ".partial"
    loaded = models.load_model(model)
    if loaded.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer; calibration needs one")
    documents = load_documents(calib)
    bos_id = None
    if needs_bos_per_window(loaded):
        bos_id = getattr(loaded.tokenizer, "bos_token_id", None)
    tokens = calibration_tokens(loaded.tokenizer, documents, nsamples, seqlen, seed, bos_id=bos_id)
    if history_layer == "auto":
        history_layer = models.block_linears(loaded.model, 0)[0].name
    calibration = {"source": calib if isinstance(calib, str) else list(calib), "seed": seed}
    if progress:
        print(f"pruning {model}: {settings.describe()}, calibration {nsamples}×{seqlen} tokens of {calib}",
              file=sys.stderr, flush=True)
    report = prune_model(loaded, tokens, settings, work_dir=work_dir, calibration=calibration,
                         history_layer=history_layer, progress=progress, after_block=after_block,
                         devices=devices)
    models.save_hf_folder(loaded, out_dir, overwrite=True)
    _write_plots(report, out_dir)
    tmp = os.path.join(out_dir, REPORT_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report.to_json() | {"model": model, "history": report.history}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, REPORT_NAME))
    shutil.rmtree(work_dir, ignore_errors=True)
    return loaded, report
