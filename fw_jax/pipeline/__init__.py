"""The pruning pipeline: calibration data, pruning a whole model, perplexity, reports and plots.

  * ``data.py``      calibration windows (SparseGPT/Wanda protocol) and evaluation text
  * ``methods/``     the layer-pruning methods, one file each, each owning its settings
  * ``settings.py``  ``PruneSettings``: what every method shares (budget, reconstruction, recovery ...)
  * ``prune.py``     ``prune_model``: the engine, sequential block-by-block pruning of any ``models.Blocks``
  * ``resume.py``    resuming an interrupted run from its checkpoints
  * ``run.py``       ``prune_to_folder``: model in, pruned checkpoint + report + plots out
  * ``output.py``    which folders a run may write, replace or delete (fw_jax's marker), atomically
  * ``evaluate.py``  perplexity of one or several models, and everything ``fw-jax eval`` measures, as a table
  * ``plots.py``     per-layer error reduction, per-block summary and convergence plots

Progress (bars on a terminal, lines in a log) is chosen with ``progress=Progress(VERBOSE)``,
``Progress(QUIET)`` or a bool, from ``fw_jax/_progress.py``.
"""

from fw_jax._progress import NORMAL, QUIET, VERBOSE, Progress
from fw_jax.pipeline.data import (
    DataError,
    calibration_tokens,
    evaluation_tokens,
    load_documents,
    needs_bos_per_window,
)
from fw_jax.pipeline.evaluate import Evaluation, evaluate_models, evaluate_perplexity, format_table
from fw_jax.pipeline.output import OutputError
from fw_jax.pipeline.methods import (
    METHODS, RIA, Magnitude, Method, SparseFW, SparseFWPublished, SparseGPT, Wanda, method_from_options,
)
from fw_jax.pipeline.prune import (
    PruneInterrupted, PruneReport, PruneSettings, ResumeMismatch, atomic_write, check_model, prune_layer, prune_model,
)
from fw_jax.pipeline.allocation import Allocation
from fw_jax.pipeline.finetune import FinetuneInterrupted, FinetuneSettings, finetune
from fw_jax.pipeline.recover import RecoverSettings
from fw_jax.pipeline.run import AlreadyPruned, prune_to_folder

__all__ = [
    "AlreadyPruned",
    "NORMAL",
    "Progress",
    "QUIET",
    "VERBOSE",
    "DataError",
    "OutputError",
    "PruneInterrupted",
    "ResumeMismatch",
    "check_model",
    "METHODS",
    "Method",
    "Magnitude",
    "Wanda",
    "RIA",
    "SparseGPT",
    "SparseFW",
    "SparseFWPublished",
    "method_from_options",
    "PruneReport",
    "PruneSettings",
    "RecoverSettings",
    "Allocation",
    "FinetuneInterrupted",
    "FinetuneSettings",
    "finetune",
    "atomic_write",
    "calibration_tokens",
    "Evaluation",
    "evaluate_models",
    "evaluate_perplexity",
    "evaluation_tokens",
    "format_table",
    "load_documents",
    "needs_bos_per_window",
    "prune_layer",
    "prune_model",
    "prune_to_folder",
]
