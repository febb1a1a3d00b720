"""fw_jax: prune large language models by solving each layer's mask problem with Frank-Wolfe.

    >>> import fw_jax
    >>> sol = fw_jax.solve_layer(W, G, k)              # k kept weights in every row
    >>> sol = fw_jax.solve_layer(W, G, fw_jax.NM(2, 4))  # 2 kept in every 4 inputs
    >>> sol.mask, sol.loss, sol.warm_loss, sol.lower_bound, sol.certificate

The public API is what this module exports (``__all__``), each name with an example in its
docstring, where ``W`` is a ``(d_out, d_in)`` weight, ``G = X Xᵀ`` the ``(d_in, d_in)`` Gram
matrix of its calibration inputs and ``k`` the weights kept per row:

- the solver: :func:`solve_layer`, its :class:`SolverOptions`, :class:`LayerSolution` and
  :class:`Status`; :func:`mask_lower_bound` certifies any mask;
- budgets: :class:`PerRow` (or an int), :class:`NM`, :class:`LayerBudget`;
- step rules: :class:`ExactLineSearch`, :class:`OpenLoop`, :class:`ShortStep`;
- baselines: magnitude, Wanda and RIA scores and masks, :func:`saliency_mask`,
  :func:`sparsegpt`, :func:`sparsefw_published` (the seed paper's recipe);
- errors: :func:`layer_error`, :func:`row_errors`; :func:`reconstruct` refits kept weights;
- any Flax NNX model in one call: :func:`prune` (``fw_jax.pipeline.flax_prune``).

Layout: ``fw_jax/solver`` (Frank-Wolfe, oracles, budgets, steps, baselines), ``fw_jax/models``
(Flax models, checkpoint loaders and writers), ``fw_jax/pipeline`` (calibration, methods,
pruning a model, evaluation), ``fw_jax/cli.py`` (the ``fw-jax`` command); ``docs/design.md``
explains them and says where to add a budget, an oracle, a method or a model family.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, see __getattr__ below
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
    from fw_jax.pipeline.flax_prune import prune

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
    "prune",
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

_SUBPACKAGES = ("models", "pipeline", "solver")


def __getattr__(name: str):
    """The public names are imported on first use (``fw_jax.solve_layer`` imports
    ``fw_jax.solver``, and JAX with it), so that ``import fw_jax.cli`` and ``fw-jax --help``
    do not wait for JAX."""
    import importlib

    if name == "prune":
        value = importlib.import_module("fw_jax.pipeline.flax_prune").prune
    elif name in __all__:
        value = getattr(importlib.import_module("fw_jax.solver"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later uses do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
