"""SparseGPT: a greedy mask with second-order updates of the kept weights."""

from __future__ import annotations

import dataclasses

from fw_jax.solver import sparsegpt

from . import Layer, Method, Pruned, register


@register
@dataclasses.dataclass(frozen=True)
class SparseGPT(Method):
    """SparseGPT (:func:`fw_jax.solver.sparsegpt` with its default block size and dampening), on
    the fitted Gram matrix."""

    name = "sparsegpt"
    summary = "SparseGPT: greedy mask with second-order updates of the kept weights"

    def prune(self, layer: Layer) -> Pruned:
        mask, new_weight = sparsegpt(layer.weight, layer.fitted, layer.budget)
        return Pruned(mask, new_weight)
