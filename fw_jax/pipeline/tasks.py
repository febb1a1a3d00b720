"""Zero-shot task accuracy, scored as lm-evaluation-harness scores multiple choice.

A task is a list of items, each a context, its choices and the index of the right one (lm-eval's
multiple-choice form; one JSON object a line: ``{"context": str, "choices": [str, ...],
"gold": int}``). Every choice is scored by the sum of the log-probabilities of its tokens given
the context, with the pair encoded as lm-eval's ``_encode_pair`` does: trailing whitespace of the
context moves to the continuation, context+continuation is tokenized whole, and the
continuation's tokens are those after the context's own tokens. ``acc`` takes the argmax of the
sum, ``acc_norm`` of the sum divided by the continuation's length in bytes. A *cloze* item has
one choice and counts as right when every one of its tokens is the model's greedy choice
(LAMBADA's accuracy).

Built-in tasks (``builtin:NAME``) are made here, deterministically, from text that needs no
download; they are proxies for the published suite, not the published benchmarks:

- ``pydoc-next-sentence``, ``persuasion-next-sentence``: two sentences of context, the true next
  sentence among three others drawn from the same text;
- ``pydoc-cloze``, ``persuasion-cloze``: a passage whose last word is to be predicted.

``pydoc`` is the held-out half of CPython's documentation (``pydoc-eval``); *Persuasion* is read
from the corpora folder (``FW_JAX_CORPORA``, else ``../shared/corpora`` beside the working
directory or the package).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fw_jax import _progress
from fw_jax.models import LoadedModel, load_model, logits

from .data import DataError, load_documents, needs_bos_per_window, not_utf8

__all__ = ["BUILTIN_TASKS", "Item", "Task", "TaskResult", "encode_pair", "evaluate_tasks", "load_task",
           "score_items"]

BUILTIN_TASKS = ("pydoc-next-sentence", "persuasion-next-sentence", "pydoc-cloze", "persuasion-cloze")
#: Padded lengths: every 32 tokens up to 512, then powers of two; a task compiles a handful of shapes.
BUCKETS = tuple(range(32, 513, 32)) + (1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: ``choices[gold]`` is the right continuation of ``context``."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of items; ``kind`` is ``"choice"`` (acc, acc_norm) or ``"cloze"`` (greedy)."""

    name: str
    items: tuple[Item, ...]
    kind: str = "choice"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Accuracy of one model on one task, with standard errors (of the mean of 0/1 scores)."""

    task: str
    items: int
    acc: float
    acc_stderr: float
    acc_norm: Optional[float] = None  #: ``None`` for cloze tasks
    acc_norm_stderr: Optional[float] = None
    truncated: int = 0  #: items whose context was cut from the left to fit the model's positions

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Tasks: from a file or built in


def load_task(spec: str | os.PathLike, *, size: int = 200, seed: int = 0) -> Task:
    """A task from a JSONL file (one item a line) or ``builtin:NAME`` (see :data:`BUILTIN_TASKS`).

    Args:
      spec: a ``.jsonl`` path, or ``builtin:`` followed by a built-in task's name.
      size: items of a built-in task.
      seed: seed of a built-in task's draw (its passages, distractors and their order).

    Raises:
      DataError: naming the file and line: a file that is not UTF-8, a line that is not JSON or
      not an item, an empty context type, empty choices, ``gold`` out of range, an empty file, or
      an unknown name.

    Example:
      >>> task = load_task("builtin:pydoc-next-sentence", size=50)
      >>> len(task.items), len(task.items[0].choices)
      (50, 4)
    """
    spec = os.fspath(spec)
    if spec.startswith("builtin:"):
        return _builtin(spec[len("builtin:"):], size, seed)
    if not os.path.isfile(spec):
        raise DataError(spec, "no such task file (expected a .jsonl file, one item a line, or builtin:NAME "
                              f"with NAME one of {', '.join(BUILTIN_TASKS)})")
    try:
        with open(spec, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(spec, f"cannot read the task file ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(spec, data, 'UTF-8 JSONL, one JSON object a line: {"context": str, "choices": [str, ...], '
                                   '"gold": int}') from None
    items = []
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if line.strip():
            items.append(_item(spec, number, line))
    if not items:
        raise DataError(spec, 'no items: expected one JSON object a line, {"context": str, "choices": [str, ...], '
                              '"gold": int}')
    kind = "cloze" if all(len(item.choices) == 1 for item in items) else "choice"
    return Task(os.path.splitext(os.path.basename(spec))[0], tuple(items), kind)


def _item(path: str, number: int, line: str) -> Item:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not JSON ({e.msg}); expected one object a line", line=number) from None
    if not isinstance(raw, dict):
        raise DataError(path, f"expected a JSON object, got {type(raw).__name__}", line=number)
    context, choices, gold = raw.get("context"), raw.get("choices"), raw.get("gold")
    if not isinstance(context, str):
        raise DataError(path, '"context" must be a string', line=number)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise DataError(path, '"choices" must be a non-empty list of non-empty strings', line=number)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(path, f'"gold" must be an index into the {len(choices)} choices, got {gold!r}', line=number)
    return Item(context, tuple(choices), gold)


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’']?\s+(?=[\"“‘A-Z])")
#: Words ending in a full stop that do not end a sentence ("Mr. Elliot", "e.g. The").
_ABBREVIATIONS = frozenset("mr. mrs. ms. dr. st. sir. capt. col. adm. gen. lt. e.g. i.e. etc. vs. cf. no. fig.".split())


def _split_sentences(flat: str) -> list[str]:
    pieces: list[str] = []
    for piece in _SENTENCE_END.split(flat):
        last = pieces[-1].rsplit(" ", 1)[-1] if pieces else ""
        if last.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]\.", last):  # an abbreviation or an initial
            pieces[-1] = f"{pieces[-1]} {piece}"
        else:
            pieces.append(piece)
    return pieces


def _sentences(text: str) -> list[str]:
    """Sentences of plain prose with 6 to 40 words (whitespace collapsed)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _split_sentences(flat):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[-1] in ".!?" and not re.search(r"[{}<>|=_*`#\\]", sentence):
                out.append(sentence)
    return out


def _corpus(name: str) -> str:
    if name == "pydoc":
        return "\n\n".join(load_documents("pydoc-eval"))
    folders = [os.environ.get("FW_JAX_CORPORA"), os.path.join(os.getcwd(), "..", "shared", "corpora"),
               os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "corpora")]
    for folder in filter(None, folders):
        path = os.path.join(folder, "austen_persuasion.txt")
        if os.path.isfile(path):
            return "\n\n".join(load_documents(path))
    raise DataError("builtin:persuasion", "austen_persuasion.txt not found: set FW_JAX_CORPORA to the folder "
                                          f"that holds it (looked in {', '.join(os.path.abspath(f) for f in filter(None, folders))})")


def _builtin(name: str, size: int, seed: int) -> Task:
    if name not in BUILTIN_TASKS:
        raise DataError(f"builtin:{name}", f"no such built-in task; there are {', '.join(BUILTIN_TASKS)}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    text_name, kind = name.split("-", 1)
    sentences = _sentences(_corpus(text_name))
    rng = np.random.default_rng([seed, BUILTIN_TASKS.index(name)])
    items = []
    if kind == "next-sentence":
        starts = rng.choice(len(sentences) - 2, size=min(size, len(sentences) - 2), replace=False)
        for s in starts:
            truth = sentences[s + 2]
            distractors: list[str] = []
            while len(distractors) < 3:  # other sentences of the same text, not the context's
                other = sentences[int(rng.integers(len(sentences)))]
                if other not in (truth, sentences[s], sentences[s + 1], *distractors):
                    distractors.append(other)
            order = rng.permutation(4)
            choices = [([truth] + distractors)[i] for i in order]
            items.append(Item(f"{sentences[s]} {sentences[s + 1]}", tuple(" " + c for c in choices),
                              int(np.argmax(order == 0))))
        return Task(name, tuple(items), "choice")
    candidates = [i for i in range(2, len(sentences)) if re.fullmatch(r"[A-Za-z]{3,}", sentences[i].split()[-1][:-1])]
    for i in rng.choice(candidates, size=min(size, len(candidates)), replace=False):
        last = sentences[i]
        *head, word = last[:-1].split()
        context = " ".join([sentences[i - 2], sentences[i - 1], *head])
        items.append(Item(context, (" " + word,), 0))
    return Task(name, tuple(items), "cloze")


# --------------------------------------------------------------------------------------------
# Scoring


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's and the continuation's token ids, as lm-eval's ``_encode_pair`` makes them.

    Example:
      >>> encode_pair(tokenizer, "The cat sat on the ", "mat")  # the space goes with " mat"
      ([504, 2644, 3290, 319, 260], [1843])
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    n = len(_encode(tokenizer, context))
    return whole[:n], whole[n:]


@jax.jit
def _continuation_scores(out, targets, weights):
    """Per row: sum of target log-probabilities where ``weights`` is 1, and whether all of those
    targets are the argmax."""
    logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(out, axis=-1) == targets
    return jnp.sum(picked * weights, axis=-1), jnp.all(greedy | (weights == 0), axis=-1)


def score_items(loaded: LoadedModel, items: Sequence[Item], *, tokenizer: Any = None, batch_size: int = 8,
                max_length: Optional[int] = None, desc: str = "scoring"):
    """Log-likelihood of every choice of every item, and whether each is the greedy continuation.

    Requests (item, choice) are tokenized with :func:`encode_pair`, sorted by length, padded on
    the right to the next of :data:`BUCKETS` and run ``batch_size`` at a time (so a task compiles
    a handful of shapes). A context longer than the model's positions is cut from the left, as
    lm-eval does. An empty context is the BOS token (else EOS). Models that need BOS at the
    start of every window (Gemma) get it before every context.

    Returns:
      ``(logliks, greedy, truncated)``: a list per item of per-choice summed log-probabilities, a
      list per item of per-choice booleans, and the number of items whose context was cut.
    """
    tok = loaded.tokenizer if loaded.tokenizer is not None else tokenizer
    if tok is None:
        raise ValueError(f"{loaded.source} has no tokenizer; pass tokenizer=")
    limit = max_length or getattr(loaded.config, "max_position_embeddings", None) or getattr(
        loaded.config, "n_positions", None) or 2048
    bos = getattr(tok, "bos_token_id", None)
    prefix = [bos] if needs_bos_per_window(loaded) and bos is not None else []
    start = bos if bos is not None else getattr(tok, "eos_token_id", None)
    requests, truncated = [], set()
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context, continuation = encode_pair(tok, item.context, choice)
            if not continuation:
                raise ValueError(f"item {i}: choice {j} {choice!r} has no tokens of its own")
            context = prefix + (context or ([start] if start is not None and not prefix else []))
            if not context:
                raise ValueError(f"item {i} has an empty context and the tokenizer has no BOS or EOS token")
            whole = (context + continuation)[-(limit + 1):]  # lm-eval: cut the context from the left
            if len(context) + len(continuation) > limit + 1:
                truncated.add(i)
            if len(continuation) >= len(whole):
                raise ValueError(f"item {i}: choice {j} is longer than the model's {limit} positions")
            requests.append((len(whole) - 1, i, j, whole, len(continuation)))
    requests.sort(key=lambda r: -r[0])
    logliks = [[0.0] * len(item.choices) for item in items]
    greedy = [[False] * len(item.choices) for item in items]
    pad = int(start if start is not None else 0)
    with _progress.current().steps(len(requests), desc, unit="choice") as steps:
        for b in range(0, len(requests), batch_size):
            batch = requests[b:b + batch_size]
            width = min(next((n for n in BUCKETS if n >= batch[0][0]), batch[0][0]), limit)
            tokens = np.full((batch_size, width), pad, np.int32)
            targets = np.zeros((batch_size, width), np.int32)
            weights = np.zeros((batch_size, width), np.float32)
            for row, (length, _, _, whole, n_cont) in enumerate(batch):
                tokens[row, :length] = whole[:-1]
                targets[row, :length] = whole[1:]
                weights[row, length - n_cont:length] = 1.0  # the continuation's predictions only
            sums, all_greedy = _continuation_scores(logits(loaded.model, jnp.asarray(tokens)),
                                                    jnp.asarray(targets), jnp.asarray(weights))
            sums, all_greedy = np.asarray(sums), np.asarray(all_greedy)
            for row, (_, i, j, _, _) in enumerate(batch):
                logliks[i][j] = float(sums[row])
                greedy[i][j] = bool(all_greedy[row])
            steps.advance(len(batch))
    return logliks, greedy, len(truncated)


def _mean_and_stderr(hits: Sequence[bool]) -> tuple[float, float]:
    """Mean of 0/1 scores and its standard error (sample standard deviation / √n), as lm-eval."""
    x = np.asarray(hits, np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def task_result(task: Task, logliks, greedy, truncated: int = 0) -> TaskResult:
    """Accuracy from per-choice scores (see :func:`score_items`)."""
    if task.kind == "cloze":
        acc, se = _mean_and_stderr([g[0] for g in greedy])
        return TaskResult(task.name, len(task.items), acc, se, truncated=truncated)
    hits = [int(np.argmax(scores)) == item.gold for item, scores in zip(task.items, logliks)]
    norm = [int(np.argmax([s / len(c.encode("utf-8")) for s, c in zip(scores, item.choices)])) == item.gold
            for item, scores in zip(task.items, logliks)]
    acc, se = _mean_and_stderr(hits)
    acc_norm, se_norm = _mean_and_stderr(norm)
    return TaskResult(task.name, len(task.items), acc, se, acc_norm, se_norm, truncated)


def evaluate_tasks(models: Mapping[str, Any], tasks: Sequence[Task], *, batch_size: int = 8,
                   progress: bool | _progress.Progress = True) -> dict[str, dict[str, TaskResult]]:
    """Accuracy of each model on each task: ``{model: {task: TaskResult}}``.

    Models given as paths are loaded one at a time and released after their evaluation.

    Example:
      >>> tasks = [load_task("builtin:pydoc-next-sentence")]
      >>> evaluate_tasks({"dense": "smollm2-135m"}, tasks)["dense"]["pydoc-next-sentence"].acc
      0.61
    """
    results: dict[str, dict[str, TaskResult]] = {}
    with _progress.use(progress) as report:
        for name, model in models.items():
            loaded = model if isinstance(model, LoadedModel) else load_model(model)
            if loaded.streamed:  # scoring runs each batch through every block: read it whole
                loaded = load_model(loaded.source, dtype=loaded.dtype)
            results[name] = {}
            for task in tasks:
                scores = score_items(loaded, task.items, batch_size=batch_size, desc=f"{task.name} on {name}")
                result = task_result(task, *scores)
                if result.truncated:
                    report.say(f"{task.name}: {result.truncated} contexts were longer than {name}'s positions "
                               "and were cut from the left (as lm-eval does)")
                results[name][task.name] = result
            del loaded
    return results
