"""``fw_jax.prune``: prune a Flax NNX model you already have, in one call.

    >>> report = fw_jax.prune(model, batches, forward=lambda m, batch: m(*batch), sparsity=0.5)

The model is cut at its blocks (``model.layers``, found or named), and the pruning engine of
``fw-jax prune`` runs over them (:func:`fw_jax.pipeline.prune_model`): block by block, each
block's linear layers (found by tracing it: :class:`fw_jax.models._traced.TracedBlocks`) pruned
on the Gram matrices of the pruned model's activations, with the same methods, budgets,
reconstruction and report.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from fw_jax.models._linen_blocks import LinenBlocks, is_linen_pair
from fw_jax.models._traced import TracedBlocks

__all__ = ["prune"]


def prune(
    model,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable] = None,
    sparsity: float = 0.5,
    pattern: Optional[tuple[int, int]] = None,
    method: str = "sparsefw",
    blocks: Optional[str] = None,
    targets: Optional[str] = None,
    exclude: Optional[str] = None,
    sequential: bool = True,
    progress=True,
    **method_options,
):
    """Prune every linear layer in the blocks of a Flax model: an NNX module in place, or a linen
    ``(module, params)`` pair into new parameters.

    Args:
      model: a ``flax.nnx.Module`` whose blocks are a list of modules run one after another
        (``model.layers``, an ``nnx.List``); or a linen ``(module, params)`` pair (``params``
        the tree ``module.init`` gave, with or without its ``{"params": ...}`` wrapper) whose
        blocks are submodules named ``layers_0``, ``layers_1``, ... (a list assigned in
        ``setup``; see ``fw_jax.models._linen_blocks``), whose parameters are left unchanged.
      batches: the calibration batches, an iterable of whatever ``forward`` takes.
      forward: ``forward(model, batch)`` runs the model on one batch, eagerly (not under
        ``jax.jit``); default ``model(batch)``. Only the part before the first block is run
        through it. For a linen pair, ``forward(module, variables, batch)``, default
        ``module.apply(variables, batch)``.
      sparsity: fraction of each output row's weights pruned; ``pattern``: ``(n, m)`` keeps ``n``
        of every ``m`` consecutive inputs instead.
      method: a method of ``fw-jax prune`` (``"sparsefw"``, ``"wanda"``, ``"sparsegpt"``, ...),
        its options in ``method_options`` (``alpha=0.5``), with ``reconstruct=True``,
        ``recover=``, ``allocation=``, ``shrinkage=`` as in
        :class:`~fw_jax.pipeline.PruneSettings`.
      blocks: a dotted path to the list of blocks, when it is not the model's longest list of
        modules; for a linen pair, the blocks' name prefix (``"layers"``, ``"decoder/layers"``).
      targets: a regular expression searched in the weights' names (parameter paths such as
        ``"layers.3.attn.q_proj.w"``, ``"layers.3.mlp.gate_proj[5]"`` for expert 5 of a stacked
        array): only the weights it matches are pruned, routers included.
      exclude: a regular expression: the weights whose names it matches are left dense.
      sequential: calibrate each block on the pruned blocks' outputs (default); ``False``
        calibrates every block on the dense model's activations.
      progress: as for :func:`fw_jax.pipeline.prune_model`.

    Returns:
      For an NNX module, the :class:`~fw_jax.pipeline.PruneReport` of ``fw-jax prune``: a record per layer (errors,
      Wanda's error, bound, time); an expert's record also has ``tokens`` (the calibration tokens
      routed to it) and, if it got none, ``fallback``. ``report.left_dense`` names the
      parameters that were used with the activations but not pruned, and why. For a linen
      pair, ``(new_params, report)``, ``new_params`` in the form ``params`` was given; weights
      are named by the blocks' prefix, index and path within the block
      (``"layers.3.Dense_0.kernel"``).

    Example:
      >>> report = fw_jax.prune(model, [tokens[i:i + 8] for i in range(0, 128, 8)], sparsity=0.5)
      >>> report.summary()  # the layers' mean error against Wanda's, the fraction of weights kept
    """
    from .settings import PruneSettings

    settings = PruneSettings.from_options(method, sparsity=sparsity, pattern=pattern, **method_options)
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches: pass at least one batch")
    chosen = dict(targets=targets, exclude=exclude, sequential=sequential)
    if is_linen_pair(model):
        shadow = LinenBlocks(*model, batches[0], forward=forward, blocks=blocks)
        traced = TracedBlocks(shadow, blocks=shadow.blocks_path, **chosen)
        traced.source = type(model[0]).__name__
        report = _run(traced, batches, settings, progress)
        return shadow.new_params(), report
    return _run(TracedBlocks(model, forward, blocks=blocks, **chosen), batches, settings, progress)


def _run(traced: TracedBlocks, batches: list, settings, progress):
    from .prune import prune_model

    calibration = {"front_end": "fw_jax.prune", "model": traced.source, "batches": len(batches),
                   "sequential": traced.sequential}
    report = prune_model(traced, batches, settings, calibration=calibration, progress=progress)
    return _annotated(report, traced)


def _annotated(report, traced: TracedBlocks):
    """The report with what was left dense (each expert's routed tokens and fallback are in its
    record already: the engine merges the front-end's ``layer_notes``)."""
    report.left_dense = dict(traced.skipped)
    return report
