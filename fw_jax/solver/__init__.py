"""Layer solvers: the Frank-Wolfe mask solver and its parts, and the greedy baselines.

Where things live:
  * ``_frank_wolfe.py``  the Frank-Wolfe loop (one GEMM per iteration, per-unit steps/stopping)
  * ``_budgets.py``      budgets (per row, n:m, per layer), each with its units, oracle,
                         rounding, mask check and swaps (``swap_refine``); ``_swaps.py``
                         the 1-swap refinement itself (imports no budget)
  * ``_lmo.py``          linear minimization oracles (capped simplex, n:m): ``init``/``__call__``
  * ``_steps.py``        step rules (open loop, exact line search, short step)
  * ``_options.py``      ``SolverOptions``, the solver's tuning
  * ``_saliency.py``     magnitude / Wanda / RIA scores and masks
  * ``_solve.py``        ``solve_layer``: warm start → fix → FW → round → swaps → certificate
  * ``_psd.py``          is the Gram matrix PSD? (Lanczos: the bound needs it); ``_validation.py`` input checks
  * ``_published.py``    the published SparseFW recipe, plainly (the reference)
  * ``_sparsegpt.py``    SparseGPT; ``_reconstruct.py`` refitting kept weights for a fixed mask
"""

from fw_jax.solver._budgets import NM, Budget, LayerBudget, PerRow, as_budget, round_to_budget, swap_refine
from fw_jax.solver._frank_wolfe import FWHistory, FWResult, frank_wolfe, pairwise_frank_wolfe
from fw_jax.solver._lmo import NMLMO, Oracle, TopKLMO, vertices
from fw_jax.solver._objective import inputs_error, layer_error, row_errors, weights_error
from fw_jax.solver._published import PublishedResult, sparsefw_published
from fw_jax.solver._reconstruct import reconstruct
from fw_jax.solver._options import LMO_METHODS, SolverOptions
from fw_jax.solver._saliency import (
    magnitude_mask,
    magnitude_scores,
    ria_mask,
    ria_scores,
    saliency_mask,
    saliency_scores,
    wanda_mask,
    wanda_scores,
)
from fw_jax.solver._solve import LayerSolution, Status, mask_lower_bound, solve_layer
from fw_jax.solver._sparsegpt import sparsegpt
from fw_jax.solver._sharding import row_mesh, shard_rows
from fw_jax.solver._steps import STEP_RULES, ExactLineSearch, OpenLoop, ShortStep, StepInfo
from fw_jax.solver._swaps import SwapResult

__all__ = [name for name in dir() if not name.startswith("_")]
