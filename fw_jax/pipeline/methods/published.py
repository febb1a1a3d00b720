"""The seed paper's recipe, as published: α = 0.9 from a Wanda warm start, 2000 open-loop iterations."""

from __future__ import annotations

import dataclasses

from fw_jax.solver import sparsefw_published

from . import Layer, Method, Pruned, register


@register
@dataclasses.dataclass(frozen=True)
class SparseFWPublished(Method):
    """:func:`fw_jax.solver.sparsefw_published`: no settings, it is the recipe as published."""

    name = "sparsefw-published"
    summary = "the seed paper's recipe: α = 0.9, 2000 open-loop Frank-Wolfe iterations"
    refusal = "it is the published recipe, α = 0.9 from a Wanda warm start, as is"

    def prune(self, layer: Layer) -> Pruned:
        return Pruned(sparsefw_published(layer.weight, layer.fitted, layer.budget, lmo_method="search").mask)
