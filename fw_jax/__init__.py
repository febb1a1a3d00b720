"""fw_jax: prune large language models by solving each layer's mask problem with Frank-Wolfe.

    >>> import fw_jax
    >>> sol = fw_jax.solve_layer(W, G, k)              # k kept weights in every row
    >>> sol = fw_jax.solve_layer(W, G, fw_jax.NM(2, 4))  # 2 kept in every 4 inputs
    >>> sol.mask, sol.loss, sol.warm_loss, sol.lower_bound, sol.certificate

Layout: ``fw_jax/solver`` (Frank-Wolfe, LMOs, steps, rounding, swaps, baselines),
``fw_jax/models`` (Flax models, checkpoint loaders), ``fw_jax/pipeline`` (calibration,
pruning a model, perplexity), ``fw_jax/cli.py`` (the ``fw-jax`` command).
"""

from fw_jax.solver import (
    NM,
    ExactLineSearch,
    LayerBudget,
    LayerSolution,
    OpenLoop,
    PerRow,
    ShortStep,
    SolverOptions,
    Status,
    layer_error,
    magnitude_mask,
    magnitude_scores,
    mask_lower_bound,
    ria_mask,
    reconstruct,
    ria_scores,
    row_errors,
    saliency_mask,
    solve_layer,
    sparsefw_published,
    sparsegpt,
    wanda_mask,
    wanda_scores,
)

__version__ = "0.1.0"

__all__ = [
    "NM",
    "ExactLineSearch",
    "LayerBudget",
    "LayerSolution",
    "OpenLoop",
    "PerRow",
    "ShortStep",
    "SolverOptions",
    "Status",
    "layer_error",
    "magnitude_mask",
    "magnitude_scores",
    "mask_lower_bound",
    "ria_mask",
    "reconstruct",
    "ria_scores",
    "row_errors",
    "saliency_mask",
    "solve_layer",
    "sparsefw_published",
    "sparsegpt",
    "wanda_mask",
    "wanda_scores",
]
