"""Sparsity allocation: a sparsity per block instead of one for the whole model, under the same
total budget.

Uniform sparsity prunes every block alike; some blocks matter more. An allocation scores every
block on the *dense* model's calibration inputs (one dense pass over the blocks before pruning),
then maps the scores linearly onto sparsities in ``[S − λ, S + λ]`` whose mean is the requested
``S`` (:func:`block_sparsities`): the block with the highest score is pruned least. Two scores:

- ``"owl"``: outlier-weighted layer-wise sparsity (OWL, Yin et al. 2023). A block's score is the
  fraction of its Wanda scores ``|W_ij|·‖x_j‖`` (all its linear layers together) above
  ``outlier`` times their mean: blocks with more outlier weights keep more.
- ``"error"``: the relative error ``Σ‖WX − ŴX‖² / Σ‖WX‖²`` of the Wanda mask at the requested
  sparsity, over the block's linear layers (the layer errors fw_jax reports): blocks that uniform
  pruning hurts most keep more.

The sparsities become whole per-row budgets by apportionment: every layer of a kind (the same
position in every block, so the same shape) keeps, summed over the blocks, exactly what uniform
sparsity keeps (largest remainders), so the model's overall sparsity is exactly the requested
one, and so is each kind's. Per-row budgets only: n:m patterns fix the count of every group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from fw_jax import models
from fw_jax.solver import saliency_mask, saliency_scores, weights_error


__all__ = ["ALLOCATIONS", "Allocation", "allocate", "apportion", "block_score", "block_sparsities"]

ALLOCATIONS = ("owl", "error")  #: the block scores an :class:`Allocation` can use


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A sparsity per block from the dense model's calibration inputs.

    Attributes:
      method: the block score, one of :data:`ALLOCATIONS` (module docstring).
      lam: the largest deviation of a block's sparsity from the requested one (OWL's λ; its
        paper uses 0.08 for LLaMA at 70%).
      outlier: ``"owl"``: a Wanda score is an outlier above this many times its block's mean
        (OWL's M, 5 in its paper).

    Example:
      >>> PruneSettings(sparsity=0.7, allocation=Allocation("owl", lam=0.08))
    """

    method: str = "owl"
    lam: float = 0.08
    outlier: float = 5.0

    def __post_init__(self):
        if self.method not in ALLOCATIONS:
            raise ValueError(f"allocation method must be one of {', '.join(ALLOCATIONS)}; got {self.method!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and 0 <= self.lam < 1):
            raise ValueError(f"allocation lam (λ, the largest deviation from the requested sparsity) must be in "
                             f"[0, 1), got {self.lam!r}")
        if not (isinstance(self.outlier, (int, float)) and math.isfinite(self.outlier) and self.outlier > 0):
            raise ValueError(f"allocation outlier (OWL's M) must be a positive number, got {self.outlier!r}")

    def check(self, sparsity: float) -> None:
        """Raise ``ValueError`` unless every block's sparsity ``S ± λ`` is in ``[0, 1)``."""
        if sparsity - self.lam < 0 or sparsity + self.lam >= 1:
            raise ValueError(f"allocation λ = {self.lam} with sparsity {sparsity}: a block's sparsity would leave "
                             f"[0, 1) ({sparsity - self.lam:.3f} to {sparsity + self.lam:.3f}); lower λ")


def block_score(allocation: Allocation, linears: Sequence, grams: dict, sparsity: float) -> float:
    """The score of one block (module docstring) from its linear layers (``models.block_linears``)
    and their input Gram matrices (``models.block_grams``) on the dense model's inputs."""
    if allocation.method == "owl":
        outliers = total = 0
        scores = [saliency_scores("wanda", layer.weight, grams[layer.input_key]) for layer in linears]
        mean = sum(float(jnp.sum(s)) for s in scores) / sum(s.size for s in scores)
        for s in scores:
            outliers += int(jnp.sum(s > allocation.outlier * mean))
            total += s.size
        return outliers / total
    error = energy = 0.0
    for layer in linears:
        w, g = jnp.asarray(layer.weight, jnp.float32), grams[layer.input_key]
        k = max(1, int(round(w.shape[1] * (1.0 - sparsity))))
        mask = saliency_mask(saliency_scores("wanda", w, g), k)
        error += float(weights_error(w, g, jnp.where(mask, w, 0)))
        energy += float(weights_error(w, g, jnp.zeros_like(w)))
    return error / max(energy, np.finfo(np.float32).tiny)


def block_sparsities(scores: Sequence[float], sparsity: float, lam: float) -> np.ndarray:
    """Scores → sparsities with mean ``S`` in ``[S − λ, S + λ]``, linear in the score, the highest
    score pruned least. OWL's map spreads the scores over ``2λ`` and centres them on their mean;
    where that would take a block beyond ``S ± λ`` (skewed scores) the spread is narrowed until
    it does not. All equal scores (or λ = 0) give ``S`` everywhere."""
    scores = np.asarray(scores, np.float64)
    spread = scores.max() - scores.min() if scores.size else 0.0
    if spread <= 0 or lam == 0:
        return np.full(scores.shape, float(sparsity))
    deviation = (scores - scores.mean()) / spread * 2 * lam  # OWL: a range of 2λ, mean 0
    deviation *= min(1.0, lam / np.abs(deviation).max())
    return sparsity - deviation


def apportion(block_sparsity: Sequence[float], kinds: Sequence[tuple[int, int]], sparsity: float) -> list[list[int]]:
    """Whole per-row budgets ``k[b][i]`` for layer ``i`` (of ``kinds[i] = (d_out, d_in)``) of
    block ``b``, near ``(1 − s_b)·d_in`` and in ``[1, d_in]``, such that every kind keeps, summed
    over the blocks, exactly what uniform sparsity keeps (largest remainder first, lower block
    on ties)."""
    s = np.asarray(block_sparsity, np.float64)
    blocks = len(s)
    k = np.zeros((blocks, len(kinds)), np.int64)
    for i, (_, d_in) in enumerate(kinds):
        uniform = max(1, int(round(d_in * (1.0 - sparsity))))
        ideal = np.clip((1.0 - s) * d_in, 1, d_in)
        ideal = ideal * (uniform * blocks / ideal.sum())  # the clip may have moved the sum
        base = np.clip(np.floor(ideal).astype(np.int64), 1, d_in)
        left = uniform * blocks - int(base.sum())
        order = np.lexsort((np.arange(blocks), -(ideal - np.floor(ideal))))  # largest remainder first
        step = 1 if left > 0 else -1
        while left != 0:
            moved = False
            for b in (order if step > 0 else order[::-1]):
                if left == 0:
                    break
                if 1 <= base[b] + step <= d_in:
                    base[b] += step
                    left -= step
                    moved = True
            if not moved:  # cannot happen: uniform·blocks is in [blocks, d_in·blocks]
                raise AssertionError("apportionment found no room")
        k[:, i] = base
    return k.tolist()


def allocate(blocks, hidden, allocation: Allocation, sparsity: float, progress) -> dict:
    """The allocation of a model (a :class:`fw_jax.models.Blocks`): one dense pass over the blocks
    from the block-0 inputs ``hidden`` (the model's weights are not changed; a streamed model's
    blocks are read and dropped again). Returns ``{"scores", "block_sparsity", "budgets"}``,
    ``budgets[b][i]`` the per-row count kept by layer ``i`` of block ``b``, as :func:`apportion`
    makes them. The Gram matrices are summed as the pruning's are, the same in any number of
    processes."""
    allocation.check(sparsity)
    blocks = models.as_blocks(blocks)
    count = len(blocks)
    scores, kinds = [], None
    with progress.steps(count, f"allocation ({allocation.method}): dense pass", unit="block") as steps:
        for b in range(count):
            with blocks.resident(b):
                linears = blocks.linears(b)
                shapes = [tuple(layer.weight.shape) for layer in linears]
                if kinds is None:
                    kinds = shapes
                elif shapes != kinds:
                    raise ValueError(f"allocation needs blocks of the same layers; block {b} has shapes {shapes}, "
                                     f"block 0 {kinds}")
                scores.append(block_score(allocation, linears, blocks.grams(b, hidden), sparsity))
                if b + 1 < count:
                    hidden = blocks.run(b, hidden)
            steps.advance()
    per_block = block_sparsities(scores, sparsity, allocation.lam)
    return {"method": allocation.method, "scores": [float(x) for x in scores],
            "block_sparsity": [float(x) for x in per_block], "budgets": apportion(per_block, kinds, sparsity)}
