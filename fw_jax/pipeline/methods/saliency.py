"""Saliency methods: keep the weights with the largest score in each row (or n:m group)."""

from __future__ import annotations

import dataclasses

from fw_jax.solver import saliency_mask, saliency_scores

from . import Layer, Method, Pruned, register


@dataclasses.dataclass(frozen=True)
class _Saliency(Method):
    def prune(self, layer: Layer) -> Pruned:
        return Pruned(saliency_mask(saliency_scores(self.name, layer.weight, layer.gram), layer.budget))


@register
@dataclasses.dataclass(frozen=True)
class Magnitude(_Saliency):
    """Keep the largest ``|W|``."""

    name = "magnitude"
    summary = "keep the largest |W|"


@register
@dataclasses.dataclass(frozen=True)
class Wanda(_Saliency):
    """Keep the largest ``|W|·‖x‖`` (Wanda): the warm start of ``sparsefw`` and the yardstick of
    every report."""

    name = "wanda"
    summary = "keep the largest |W|·‖x‖ (Wanda; the warm start and the yardstick of the reports)"


@register
@dataclasses.dataclass(frozen=True)
class RIA(_Saliency):
    """Keep the largest relative importance × ``‖x‖^0.5`` (RIA)."""

    name = "ria"
    summary = "keep the largest relative importance × ‖x‖^0.5 (RIA)"
