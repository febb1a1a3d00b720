"""How a model is pruned: :class:`PruneSettings`, what every method shares.

A method's own settings live in the method object (``fw_jax.pipeline.methods``); these are the
settings every method takes: the budget, reconstruction, recovery, allocation and shrinkage.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax.numpy as jnp

from fw_jax.solver import NM, Budget, PerRow

from .allocation import Allocation
from .methods import METHODS, Method, method_from_options
from .recover import RecoverSettings

__all__ = ["HIDDEN_DTYPES", "PruneSettings"]

HIDDEN_DTYPES = ("float32", "bfloat16")  #: what calibration hidden states may be kept in between blocks


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """How to prune every linear layer.

    Attributes:
      method: a :class:`~fw_jax.pipeline.methods.Method` object with its own settings (for
        example ``SparseFW(alpha=0.5)``), or the name of one in
        :data:`~fw_jax.pipeline.methods.METHODS` with its default settings. ``sparsefw`` is
        :func:`fw_jax.solve_layer` as the pipeline's recipe; ``sparsefw-published`` the seed
        paper's (α = 0.9, 2000 open-loop iterations). A name is turned into the object.
      sparsity: fraction of each row pruned (ignored when ``pattern`` is set).
      pattern: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs (2:4 keeps 2).
      reconstruct: after the mask, refit the kept weights (``fw_jax.solver.reconstruct``).
      recover: after every block's masks (and reconstruction), tune the block's kept weights to
        reproduce the dense block's output (:mod:`fw_jax.pipeline.recover`); ``None``: off.
      allocation: a sparsity per block under the same total (:mod:`fw_jax.pipeline.allocation`:
        OWL's outlier ratios or the blocks' Wanda errors); ``None``: ``sparsity`` in every
        layer. Per-row sparsity only (not with ``pattern``).
      shrinkage: ``ρ ∈ [0, 1]``; every step that fits the calibration Gram matrix (the
        ``sparsefw`` mask, SparseGPT, reconstruction) uses it shrunk toward its diagonal,
        ``(1 − ρ) G + ρ diag(G)`` (as covariance estimators shrink toward a diagonal target).
        ρ = 0 is the calibration error itself; ρ = 1 makes the mask problem separable, where
        Wanda's mask is optimal, and reconstruction a no-op. It trusts the calibration text's
        cross-channel correlations less, for text unlike it. The diagonal is unchanged, so
        Wanda, RIA and magnitude masks are too. ``None`` (the default) means the method's
        ``default_shrinkage``: 0.5 for ``sparsefw`` (chosen by perplexity in
        results/quality.md) and 0 for every other method, so the baselines run as published.
        Errors, the lower bound and the certificate are always reported for the unshrunk ``G``
        (the shrunk problem's as ``shrunk_*``). It is shared, not the method's, because
        reconstruction fits the same shrunk matrix whatever chose the mask.
    """

    method: Union[Method, str] = "sparsefw"
    sparsity: float = 0.5
    pattern: Optional[tuple[int, int]] = None
    reconstruct: bool = False
    recover: Optional[RecoverSettings] = None
    allocation: Optional[Allocation] = None
    shrinkage: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.method, str):
            object.__setattr__(self, "method", method_from_options(self.method))
        elif not isinstance(self.method, Method):
            raise ValueError(f"method must be a method name (one of {', '.join(METHODS)}) or a method object "
                             f"such as fw_jax.pipeline.SparseFW(alpha=0.5), got {self.method!r}")
        if self.recover is not None and not isinstance(self.recover, RecoverSettings):
            raise ValueError(f"recover must be None or a fw_jax.pipeline.RecoverSettings, got {self.recover!r}")
        if self.allocation is not None and not isinstance(self.allocation, Allocation):
            raise ValueError(f"allocation must be None or a fw_jax.pipeline.Allocation, got {self.allocation!r}")
        if self.shrinkage is not None and not (isinstance(self.shrinkage, (int, float))
                                               and 0.0 <= self.shrinkage <= 1.0):
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.pattern is None and not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = self.pattern
            if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
                raise ValueError(f"pattern must be (n, m) with 1 ≤ n ≤ m (n kept of every m), got {self.pattern}")
            if self.allocation is not None:
                raise ValueError(f"allocation gives blocks different per-row sparsities; an n:m pattern "
                                 f"({n}:{m}) fixes every group's count: use sparsity, or no allocation")
        elif self.allocation is not None:
            self.allocation.check(self.sparsity)

    @classmethod
    def from_options(cls, method: str = "sparsefw", **options) -> "PruneSettings":
        """Settings from flat options, as on the command line: those that are fields of
        :class:`PruneSettings` stay here, the others build the method (which refuses any it does
        not take).

        Example:
          >>> PruneSettings.from_options("sparsefw", alpha=0.5, sparsity=0.6).method.alpha
          0.5
        """
        shared = {f.name for f in dataclasses.fields(cls)} - {"method"}
        return cls(method=method_from_options(method, {k: v for k, v in options.items() if k not in shared}),
                   **{k: v for k, v in options.items() if k in shared})

    @property
    def effective_shrinkage(self) -> float:
        """``shrinkage`` with ``None`` resolved: the method's default (0.5 for ``sparsefw``, else 0)."""
        return float(self.method.default_shrinkage if self.shrinkage is None else self.shrinkage)

    @property
    def compares_with_wanda(self) -> bool:
        """Whether a layer's error can differ from Wanda's: not for Wanda's own mask with its
        weights kept (``method="wanda"`` without ``reconstruct``), where the comparison is empty."""
        return self.method.name != "wanda" or self.reconstruct

    def record(self) -> dict:
        """The settings as JSON-ready fields, flat: the method's (``method`` is its name), then the
        shared ones, ``shrinkage`` resolved (reports, the run's identity)."""
        return {
            **self.method.record(),
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "reconstruct": self.reconstruct,
            "recover": None if self.recover is None else self.recover.record(),
            "allocation": None if self.allocation is None else dataclasses.asdict(self.allocation),
            "shrinkage": self.effective_shrinkage,
        }

    def fitted_gram(self, gram):
        """The Gram matrix every fitting step uses: ``(1 − ρ) G + ρ diag(G)`` (``G`` when ρ = 0)."""
        rho = self.effective_shrinkage
        return gram if rho == 0 else (1 - rho) * gram + rho * jnp.diag(jnp.diag(gram))

    def budget(self, d_in: int) -> Budget:
        """The budget of a layer with ``d_in`` inputs."""
        if self.pattern is not None:
            return NM(*self.pattern)
        return PerRow(max(1, int(round(d_in * (1.0 - self.sparsity)))))

    def describe(self) -> str:
        target = (f"{self.pattern[0]}:{self.pattern[1]} (keep {self.pattern[0]} of every {self.pattern[1]})"
                  if self.pattern else f"{self.sparsity:.0%} per row")
        if self.allocation is not None:
            target += f" on average ({self.allocation.method} allocation, ±{self.allocation.lam:g})"
        return (f"{self.method.name}, {target}" + (" + reconstruction" if self.reconstruct else "")
                + (" + recovery" + self.recover.describe() if self.recover else ""))
