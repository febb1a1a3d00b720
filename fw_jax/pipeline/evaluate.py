"""Perplexity of one or several models on the same text, and a markdown table of the results."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from fw_jax import _progress
from fw_jax.models import LoadedModel, load_model, perplexity

from .data import evaluation_tokens, needs_bos_per_window

ModelOrPath = Union[LoadedModel, str, os.PathLike]

#: Window length of the perplexity protocol (docs/design.md §16).
DEFAULT_SEQLEN = 2048


def evaluate_perplexity(
    models: Mapping[str, ModelOrPath],
    documents: str | Sequence[str],
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    bos_per_window: bool | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 4,
    progress: bool | _progress.Progress = True,
) -> dict[str, float]:
    """Perplexity of each model on the same documents (the protocol of docs/design.md §16).

    The documents are joined with ``"\\n\\n"`` and tokenized once with the model's tokenizer
    (no special tokens); the stream is cut into non-overlapping windows of ``seqlen`` tokens, the
    tail is dropped, and perplexity is ``exp(mean token NLL)`` over every predicted token. Where
    the model needs it (Gemma, see :func:`~fw_jax.pipeline.data.needs_bos_per_window`) every
    window is BOS followed by ``seqlen - 1`` text tokens.

    Models given as paths are loaded one at a time and released after their evaluation.

    Args:
      models: ``{name: model}``, each a :class:`fw_jax.models.LoadedModel` or anything
        :func:`fw_jax.models.load_model` accepts (a folder, a ``.gguf`` file, ``"smollm2-135m"``).
      documents: evaluation texts (see :func:`~fw_jax.pipeline.data.load_documents`).
      seqlen: tokens per window.
      max_windows: evaluate only the first ``max_windows`` windows (all when ``None``).
      bos_per_window: force BOS at the start of every window on (True) or off (False); ``None``
        decides per model family.
      tokenizer: used for models that have no tokenizer of their own.
      batch_size: windows per forward pass.
      progress: report loading and the windows of each model (a bar on a terminal, a line per
        model otherwise) to stderr; a :class:`fw_jax.pipeline.Progress` chooses where and how much.

    Returns:
      ``{name: perplexity}`` in the order of ``models``.

    Raises:
      ValueError: a model without a tokenizer (and no ``tokenizer``), a model without a BOS id
        that needs one, a ``seqlen`` beyond the model's positions, or text shorter than one window.

    Example:
      >>> docs = load_documents("pydoc-eval")
      >>> evaluate_perplexity({"dense": "smollm2-135m", "wanda": "out/wanda"}, docs, max_windows=4)
      {'dense': 21.3, 'wanda': 27.9}
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    with _progress.use(progress):
        return _evaluate(models, documents, seqlen, max_windows, bos_per_window, tokenizer, batch_size)


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate_models` measured.

    Attributes:
      table: ``{model: {column: value}}``, for :func:`format_table`: perplexities as floats,
        accuracies as ``"61.5 ± 3.4"`` strings (percent ± standard error).
      record: the same results in full (JSON-ready, ``"written_by": "fw_jax"``): the
        perplexity protocol, each task's :class:`~fw_jax.pipeline.tasks.TaskResult` as a dict,
        lm-eval's own numbers.
      notes: one line per kind of column, saying how it was measured.
    """

    table: dict
    record: dict
    notes: list


def evaluate_models(
    models: Mapping[str, ModelOrPath],
    *,
    data: str | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    tasks: Sequence = (),
    task_size: int = 200,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_limit: int | None = None,
    progress: bool | _progress.Progress = True,
) -> Evaluation:
    """Everything ``fw-jax eval`` measures, for each of ``models``: perplexity on ``data``
    (:func:`evaluate_perplexity`, ``split="evaluation"``), zero-shot accuracy on ``tasks``
    (specs or loaded :class:`~fw_jax.pipeline.tasks.Task` s, :func:`~fw_jax.pipeline.tasks.evaluate_tasks`)
    and lm-evaluation-harness's tasks (:func:`~fw_jax.pipeline.harness.run_lm_eval`, on the
    saved folders). Task files are read, and lm-eval's presence checked, before any model runs.

    Raises:
      HarnessError: ``lm_eval_tasks`` without lm-eval installed, or lm-eval failing.
      ValueError: bad data, task files or settings, as the functions above say.
    """
    from . import harness
    from .data import load_documents
    from .tasks import Task, evaluate_tasks, load_task

    if lm_eval_tasks and not harness.lm_eval_available():
        raise harness.HarnessError("--lm-eval needs lm-evaluation-harness, which is not installed: "
                                   "pip install 'fw-jax[lm-eval]'")
    loaded_tasks = [t if isinstance(t, Task) else load_task(t, size=task_size) for t in tasks]
    table: dict[str, dict] = {name: {} for name in models}
    record: dict = {"written_by": "fw_jax", "models": {name: str(m) for name, m in models.items()}}
    notes = []
    with _progress.use(progress) as report_to:
        if data is not None:
            documents = load_documents(data, split="evaluation")
            perplexities = evaluate_perplexity(models, documents, seqlen=seqlen, max_windows=max_windows,
                                               progress=report_to)
            for name, value in perplexities.items():
                table[name][f"{data} ppl"] = value
            record["perplexity"] = {"data": data, "seqlen": seqlen, "max_windows": max_windows,
                                    "results": perplexities}
            windows = f"the first {max_windows} windows" if max_windows else "all windows"
            notes.append(f"perplexity: {windows} of {seqlen} tokens of {data} (non-overlapping; --seqlen, --max-windows)")
        if loaded_tasks:
            accuracies = evaluate_tasks(models, loaded_tasks, progress=report_to)
            for name, by_task in accuracies.items():
                for task, result in by_task.items():
                    table[name][f"{task} acc"] = _percent(result.acc, result.acc_stderr)
                    if result.acc_norm is not None:
                        table[name][f"{task} acc_norm"] = _percent(result.acc_norm, result.acc_norm_stderr)
            record["tasks"] = {name: {t: r.to_json() for t, r in by_task.items()} for name, by_task in accuracies.items()}
            notes.append("accuracy: % ± standard error, zero-shot, each choice scored by its summed log-probability "
                         "as lm-eval does (acc_norm: per byte; cloze: greedy match); " + ", ".join(
                             f"{t.name} {len(t.items)} items" for t in loaded_tasks))
        if lm_eval_tasks:
            report_to.say(f"lm-eval: {', '.join(lm_eval_tasks)} on {len(models)} model(s) (its hf backend, PyTorch)")
            harnessed = harness.run_lm_eval({n: str(m) for n, m in models.items()}, lm_eval_tasks,
                                            limit=lm_eval_limit)
            for name, by_task in harnessed.items():
                for task, r in by_task.items():
                    label = os.path.basename(task) if task.endswith(".jsonl") else task
                    for metric in ("acc", "acc_norm"):
                        if metric in r:
                            table[name][f"lm-eval {label} {metric}"] = _percent(r[metric], r.get(f"{metric}_stderr"))
            record["lm_eval"] = {"tasks": list(lm_eval_tasks), "limit": lm_eval_limit, "results": harnessed}
            notes.append("lm-eval: lm-evaluation-harness's own zero-shot acc / acc_norm (per character), "
                         "% ± standard error" + (f", at most {lm_eval_limit} items per task" if lm_eval_limit else ""))
    return Evaluation(table, record, notes)


def _percent(value: float, stderr: float | None) -> str:
    """``"61.5 ± 3.4"`` from a fraction and its standard error (the value alone without one)."""
    return f"{100 * value:.1f} ± {100 * stderr:.1f}" if stderr is not None and stderr == stderr else f"{100 * value:.1f}"


def _evaluate(models, documents, seqlen, max_windows, bos_per_window, tokenizer, batch_size) -> dict[str, float]:
    stream_of: dict[int, np.ndarray] = {}  # models that share a tokenizer object share its stream
    results: dict[str, float] = {}
    for name, model_or_path in models.items():
        loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load_model(model_or_path, stream=True)
        tok = loaded.tokenizer if loaded.tokenizer is not None else tokenizer
        if tok is None:
            raise ValueError(f"model {name!r} ({loaded.source}) has no tokenizer; pass tokenizer=")
        _check_positions(name, loaded.config, seqlen)
        if id(tok) not in stream_of:
            stream_of[id(tok)] = evaluation_tokens(tok, documents)
        ids = stream_of[id(tok)]
        bos = needs_bos_per_window(loaded) if bos_per_window is None else bool(bos_per_window)
        bos_id = _bos_id(tok, loaded.config) if bos else None
        if bos and bos_id is None:
            raise ValueError(
                f"model {name!r} needs a BOS token per window but neither its tokenizer nor config has one"
            )
        body = seqlen - 1 if bos else seqlen
        if len(ids) < body:
            raise ValueError(
                f"the evaluation text has {len(ids)} tokens for model {name!r}, "
                f"less than one window of {body}"
            )
        if max_windows is not None:
            ids = ids[: max_windows * body]
        results[name] = perplexity(
            loaded, ids, seqlen, bos_per_window=bos, bos_id=bos_id, batch_size=batch_size,
            desc=f"perplexity of {name}",
        )
        del loaded  # a model loaded here is released before the next one is loaded
    return results


def _check_positions(name: str, config: Any, seqlen: int) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seqlen > int(limit):
        raise ValueError(f"seqlen={seqlen} is longer than model {name!r} supports ({limit} positions)")


def _bos_id(tokenizer: Any, config: Any) -> int | None:
    for candidate in (getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None)):
        if isinstance(candidate, (int, np.integer)) and candidate >= 0:
            return int(candidate)
    return None


def format_table(results: Mapping[str, Mapping[str, float]], *, digits: int = 2, first: str = "model") -> str:
    """A markdown table of perplexities: one row per model, one column per dataset.

    Columns are the datasets in order of first appearance; a model without a value for a dataset
    shows ``-``.

    Args:
      results: ``{model: {column: value}}``; a value is a number or an already formatted string.
      digits: decimals shown.
      first: the heading of the first column (what the rows are).

    Returns:
      The table as aligned markdown text (no trailing newline).

    Example:
      >>> print(format_table({"dense": {"pydoc-eval": 21.3}, "wanda 50%": {"pydoc-eval": 27.91}}))
      | model     | pydoc-eval |
      |:----------|-----------:|
      | dense     |      21.30 |
      | wanda 50% |      27.91 |
    """
    datasets: list[str] = []
    for row in results.values():
        datasets += [d for d in row if d not in datasets]
    header = [first, *datasets]
    rows = [
        [str(model), *(_format_value(row.get(d), digits) for d in datasets)] for model, row in results.items()
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1), *("-" * (w + 1) + ":" for w in widths[1:])]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _format_value(value: float | str | None, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # already formatted (e.g. "61.0 ± 3.4")
        return value
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}f}"
