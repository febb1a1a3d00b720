"""``SolverOptions``: how :func:`fw_jax.solve_layer` solves, apart from the problem itself.

The problem (``weight, gram, budget``) and the choices a user makes about it (``warm_start``,
``alpha``, ``tol``) are arguments of ``solve_layer``; everything that tunes the solver lives in
one frozen, hashable object, which is part of the compiled solver's static configuration
(changing a field compiles a new solver). ``fw_jax.pipeline.PruneSettings`` holds one, and the
``fw-jax prune`` options take their defaults from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from fw_jax._checks import check_int
from fw_jax.solver._frank_wolfe import PRECISIONS
from fw_jax.solver._steps import as_step_rule

__all__ = ["SolverOptions", "LMO_METHODS"]

CHUNK_WEIGHTS = 1 << 22  #: weights of a row chunk that ``row_chunk=None`` aims at (16 MiB in float32)
LMO_METHODS = ("search", "bisect", "top_k")  #: threshold searches of the top-k oracle (same vertices)


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Tuning of :func:`fw_jax.solve_layer` (defaults: what ``results/`` measured best on CPU).

    Attributes:
      max_iter: Frank-Wolfe iteration cap.
      step_rule: ``"exact"`` (line search), ``"open_loop"`` (``2/(t+2)``, as published) or
        ``"short"``; or a rule object (``fw_jax.solver.ExactLineSearch`` ...).
      swaps: refine the rounded mask by 1-swaps.
      max_swaps: cap on swap steps (each step swaps at most once per unit).
      lmo_method: the top-k oracle's threshold search: ``"search"``, ``"bisect"`` or
        ``"top_k"`` (same vertices; speeds in ``results/variants.md``).
      refresh_every: period of the dense recomputation of the running products of the
        Frank-Wolfe loop and of the 1-swaps (bounding their float drift).
      precision: of the loop's products: ``"default"`` (JAX's: full float32 on CPU, TF32 on
        recent GPUs), ``"highest"`` or ``"bfloat16"`` (bfloat16 inputs, float32 sums). The
        errors, swaps and lower bound never use bfloat16 products.
      history: record per-iteration relaxed error, rounded error and gap (for plots). ``True``
        rounds every iteration (a rounding and a product more each); an int ``N ≥ 1`` records
        the rounded error every ``N``-th iteration only (NaN between), a cheaper history for
        large layers.
      row_chunk: rows solved at a time where the budget's units lie inside rows (per-row, n:m;
        ``Budget.separable_rows``): every temporary of the solve is then a chunk's size, not the
        layer's (one compiled body run over the chunks in turn; each row solved as in the whole
        layer, up to float rounding). ``None`` (the default): the largest divisor of ``d_out``
        whose chunk holds at most 2²² weights, for layers of more than twice that, else the layer
        whole (also when no divisor comes within a fourth of it); an int asks for chunks of at
        most that many rows (its largest divisor of ``d_out``). A history solves the layer whole.
        Measured in ``results/scale.md``.

    Example:
      >>> opts = fw_jax.SolverOptions(max_iter=300, step_rule="open_loop")
      >>> sol = fw_jax.solve_layer(W, G, k, options=opts)
    """

    max_iter: int = 100
    step_rule: Any = "exact"
    swaps: bool = True
    max_swaps: int = 512
    lmo_method: str = "search"
    refresh_every: int = 64
    precision: str = "default"
    history: Union[bool, int] = False
    row_chunk: Optional[int] = None

    def __post_init__(self):
        for name, least in (("max_iter", 0), ("max_swaps", 0), ("refresh_every", 1)):
            # a numpy int becomes an int: the options are hashed into the compiled solver and recorded
            object.__setattr__(self, name, check_int(f"SolverOptions.{name}", getattr(self, name), least))
        as_step_rule(self.step_rule)  # validates a name or a rule object
        if self.lmo_method not in LMO_METHODS:
            raise ValueError(f"SolverOptions.lmo_method must be one of {', '.join(LMO_METHODS)}, got {self.lmo_method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SolverOptions.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.swaps, bool):
            raise ValueError(f"SolverOptions.swaps must be True or False, got {self.swaps!r}")
        if self.row_chunk is not None:
            object.__setattr__(self, "row_chunk", check_int("SolverOptions.row_chunk", self.row_chunk, 1))
        if not isinstance(self.history, bool):
            object.__setattr__(self, "history", check_int(
                "SolverOptions.history (True, False or every how many iterations to round)", self.history, 1))

    @property
    def round_every(self) -> int:
        """Every how many iterations the history records the rounded error (1 unless ``history`` is an int)."""
        return 1 if isinstance(self.history, bool) else self.history

    def rows_per_chunk(self, d_out: int, d_in: int) -> int:
        """Rows of a ``(d_out, d_in)`` layer solved at a time (``d_out``: whole), see ``row_chunk``."""
        if self.history:
            return d_out
        wanted = self.row_chunk
        if wanted is None:
            if d_out * d_in <= 2 * CHUNK_WEIGHTS:
                return d_out
            wanted = max(1, CHUNK_WEIGHTS // d_in)
        wanted = min(wanted, d_out)
        rows = max(r for r in range(1, wanted + 1) if d_out % r == 0)
        return rows if self.row_chunk is not None or 4 * rows >= wanted else d_out

    def replace(self, **changes) -> "SolverOptions":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)
