"""The published zero-shot suite through EleutherAI's lm-evaluation-harness (an optional extra).

``fw-jax eval MODEL --lm-eval boolq,rte,...`` hands a saved model to lm-eval's ``hf`` backend
(transformers + PyTorch on the CPU or a CUDA device), so the numbers are lm-eval's own, comparable
with the papers'. A task may also be a JSONL file in fw_jax's multiple-choice form (``{"context",
"choices", "gold"}``, as ``--tasks`` reads it): it becomes a local lm-eval task with the choices
as the continuations (no delimiter added), which is how this adapter is tested offline against
fw_jax's own scorer (``tests/test_harness.py``).

Install with ``pip install fw-jax[lm-eval]``. The published tasks' datasets come from the Hugging
Face hub the first time (or from its cache; ``HF_DATASETS_OFFLINE=1`` uses only the cache);
without them the run stops with a message naming the task and what is missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

from fw_jax.models import SMOLLM2_NAME, smollm2_gguf_path

__all__ = ["PUBLISHED_SUITE", "HarnessError", "lm_eval_available", "run_lm_eval"]

#: The seed paper's zero-shot suite (and Wanda's and SparseGPT's), by lm-eval task name.
PUBLISHED_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_METRICS = ("acc", "acc_norm")


class HarnessError(RuntimeError):
    """lm-eval is missing, or could not run a task (its dataset, the model); the message says which."""


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _model_args(model: str, dtype: str) -> str:
    """lm-eval ``hf`` model arguments for a Hugging Face folder, a GGUF file or the built-in name."""
    if model == SMOLLM2_NAME:
        model = smollm2_gguf_path()
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise HarnessError(f"{model}: no config.json; --lm-eval needs a Hugging Face folder (as fw-jax prune "
                               "writes), a .gguf file or smollm2-135m")
        return f"pretrained={os.path.abspath(model)},dtype={dtype}"
    if os.path.isfile(model) and model.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(model))
        return f"pretrained={folder},gguf_file={name},dtype={dtype}"
    raise HarnessError(f"{model}: --lm-eval evaluates a Hugging Face folder, a .gguf file or smollm2-135m")


def _local_task(path: str, folder: str) -> str:
    """Write an lm-eval task config reading fw_jax's multiple-choice JSONL at ``path``; its name."""
    from fw_jax.pipeline.tasks import load_task

    task = load_task(path)  # the same checks (and errors, naming file and line) as --tasks
    if task.kind != "choice":
        raise HarnessError(f"{path}: lm-eval runs multiple-choice items; this file is a {task.kind} task")
    name = "fw_jax_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for item in task.items:
            f.write(json.dumps({"context": item.context, "choices": list(item.choices), "gold": item.gold}) + "\n")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # the choices are the continuations, as fw_jax scores them
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in _METRICS],
    }
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)  # JSON is YAML
    return name


def run_lm_eval(models: Mapping[str, str], tasks: Sequence[str], *, batch_size: int = 8,
                limit: Optional[int] = None, device: str = "cpu", dtype: str = "float32",
                logliks: bool = False) -> dict[str, dict[str, dict]]:
    """Zero-shot accuracy from lm-evaluation-harness: ``{model: {task: {"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "n"}}}`` (``acc_norm`` where the task reports it).

    Args:
      models: display name → a Hugging Face folder, a ``.gguf`` file or ``"smollm2-135m"``.
      tasks: lm-eval task names (see :data:`PUBLISHED_SUITE`) or fw_jax multiple-choice JSONL files.
      batch_size, device, dtype: for lm-eval's ``hf`` backend.
      limit: at most this many items per task (lm-eval's ``--limit``).
      logliks: also return lm-eval's log-likelihood of every choice of every item, in item
        order (``"logliks"``), to compare with :func:`fw_jax.pipeline.tasks.score_items`.

    Raises:
      HarnessError: lm-eval is not installed, a model is not in a form lm-eval reads, or a task
        could not be loaded (its dataset offline); the message names it.

    Example:
      >>> run_lm_eval({"pruned": "runs/demo/sparsefw-0.50"}, ["arc_easy"], limit=100)
    """
    if not lm_eval_available():
        raise HarnessError("--lm-eval needs lm-evaluation-harness: pip install 'fw-jax[lm-eval]' "
                           "(or pip install lm-eval)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fw_jax_lm_eval_") as folder:
        names = [_local_task(t, folder) if t.endswith((".jsonl", ".json")) else t for t in tasks]
        manager = TaskManager(include_path=folder, verbosity="ERROR")
        unknown = [t for t in names if t not in manager.all_tasks]
        if unknown:
            raise HarnessError(f"lm-eval has no task {', '.join(unknown)} (lm-eval ls tasks lists them)")
        for display, model in models.items():
            args = _model_args(str(model), dtype)
            try:
                out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=names, batch_size=batch_size,
                                              device=device, limit=limit, task_manager=manager,
                                              log_samples=logliks, verbosity="ERROR")
            except (ConnectionError, OSError, ValueError) as e:  # datasets offline, unreadable model
                raise HarnessError(f"lm-eval could not run {', '.join(tasks)} on {model}: {type(e).__name__}: {e} "
                                   "(offline, a published task's dataset must be in the Hugging Face cache)") from e
            results[display] = {task: _metrics(out["results"][name], out.get("n-samples", {}).get(name))
                                for task, name in zip(tasks, names)}
            if logliks:
                for task, name in zip(tasks, names):
                    docs = sorted(out["samples"][name], key=lambda sample: sample["doc_id"])
                    results[display][task]["logliks"] = [[float(r[0]) for r in d["filtered_resps"]] for d in docs]
    return results


def _metrics(row: Mapping[str, Any], samples: Optional[Mapping[str, Any]]) -> dict:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as plain fields."""
    record: dict[str, Any] = {}
    for metric in _METRICS:
        if f"{metric},none" in row:
            record[metric] = float(row[f"{metric},none"])
            stderr = row.get(f"{metric}_stderr,none")
            record[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    if samples:
        record["n"] = int(samples.get("effective", samples.get("original", 0)))
    return record
