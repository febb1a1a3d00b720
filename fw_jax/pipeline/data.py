"""Calibration and evaluation text: loading documents and turning them into token arrays.

- :func:`load_documents`: text files, folders, JSONL (C4-style), parquet, the built-in
  ``"pydoc-calib"`` / ``"pydoc-eval"`` texts that ship with every CPython, and Hugging Face
  ``datasets`` names (``"c4"``, ``"wikitext2"``) when that library is installed and online.
- :func:`calibration_tokens`: random windows as in SparseGPT/Wanda (docs/design.md §15).
- :func:`evaluation_tokens`: one token stream for the perplexity protocol (docs/design.md §16).

Every problem with the data (missing file, bad JSON, text too short, ...) raises
:class:`DataError`, a ``ValueError`` whose message names the file and what was expected.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

Split = Literal["calibration", "evaluation"]

PYDOC_NAMES = ("pydoc", "pydoc-calib", "pydoc-eval")
HF_DATASET_NAMES = ("c4", "wikitext2")
_BUILT_IN_NAMES = ("pydoc-calib", "pydoc-eval") + HF_DATASET_NAMES

#: Share of the pydoc text (in characters) held out for evaluation.
PYDOC_EVAL_SHARE = 0.2
#: Documents of the C4 validation shard used for evaluation (as in SparseGPT).
C4_EVAL_DOCUMENTS = 1100

_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Calibration or evaluation data that is missing, unreadable or too short.

    The message starts with the source (file, with ``:line`` when one line is at fault).
    """

    def __init__(self, source: str | os.PathLike, message: str, line: int | None = None):
        where = os.fspath(source) + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.source = os.fspath(source)
        self.line = line


# --------------------------------------------------------------------------------------------
# Documents


def load_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: Split = "calibration",
) -> list[str]:
    """Read the documents of a data source, in a deterministic order.

    Args:
      source: one of, or a list of (their documents are concatenated in order)
        - a ``.txt`` file: one document;
        - a ``.jsonl`` / ``.json`` file (optionally ``.gz``, as C4 ships): one JSON object with a
          ``"text"`` string per line (a ``.json`` file may also hold one list of such objects);
        - a ``.parquet`` file with a ``text`` column (needs ``pyarrow``);
        - a folder: every file above directly inside it, sorted by name;
        - ``"pydoc-calib"`` / ``"pydoc-eval"``: two disjoint parts of Python's own
          documentation (``pydoc_data.topics``, about 465 kB, no download), one document each;
          ``"pydoc"`` picks the part named by ``split``;
        - ``"c4"`` / ``"wikitext2"``: Hugging Face datasets (needs the ``datasets`` library and
          network); ``split`` picks the train part (calibration) or the held-out part
          (evaluation: wikitext-2 test, the first 1100 documents of C4's first validation shard).
      split: ``"calibration"`` or ``"evaluation"``; used only by ``"pydoc"`` and dataset names.

    Returns:
      The non-empty documents, as strings.

    Raises:
      DataError: a missing path, an empty or unreadable file, a JSON line without ``text``,
        invalid JSON, a folder without data files, or a dataset that cannot be loaded.

    Example:
      >>> docs = load_documents("pydoc-calib")
      >>> len(docs), len(docs[0]) > 100_000
      (1, True)
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("<data>", "no data source given")
        return [doc for one in source for doc in load_documents(one, split=split)]
    name = os.fspath(source)
    if name in PYDOC_NAMES and not os.path.exists(name):
        part = {"pydoc-calib": "calibration", "pydoc-eval": "evaluation"}.get(name, split)
        return [pydoc_text(part)]
    if name in HF_DATASET_NAMES and not os.path.exists(name):
        return _load_hf_dataset(name, split)
    if os.path.isdir(name):
        return _load_folder(name)
    if not os.path.exists(name):
        raise DataError(
            name,
            "no such file or folder (expected a .txt/.jsonl/.json/.parquet file, a folder of "
            f"them, or one of {', '.join(repr(n) for n in _BUILT_IN_NAMES)})",
        )
    documents = _load_file(name)
    if not documents:
        raise DataError(name, "contains no text")
    return documents


def pydoc_text(split: Split) -> str:
    """One part of Python's documentation topics (``pydoc_data.topics``), as one document.

    Topics are taken in sorted order; a topic goes to the evaluation part when that brings the
    evaluation share of the text seen so far closer to 20%, otherwise to the calibration part.
    The two parts are disjoint and each is joined with ``"\\n\\n"``. The text (and so the split)
    depends on the Python version.

    Args:
      split: ``"calibration"`` (about 80% of the text) or ``"evaluation"`` (about 20%).

    Returns:
      The text of that part.

    Example:
      >>> len(pydoc_text("evaluation")) < len(pydoc_text("calibration"))
      True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it
        raise DataError("pydoc", f"pydoc_data.topics is not available in this Python ({e})") from e
    parts: dict[str, list[str]] = {"calibration": [], "evaluation": []}
    seen = held_out = 0
    for key in sorted(topics):
        text = topics[key].strip()
        n = len(text)
        if held_out + n / 2 < PYDOC_EVAL_SHARE * (seen + n):
            parts["evaluation"].append(text)
            held_out += n
        else:
            parts["calibration"].append(text)
        seen += n
    return "\n\n".join(parts[split])


def _load_folder(folder: str) -> list[str]:
    suffixes = _TEXT_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
    files = sorted(
        f for f in os.listdir(folder)
        if f.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, f))
    )
    if not files:
        raise DataError(folder, f"folder has no data files (expected {', '.join(suffixes)})")
    documents = [doc for f in files for doc in _load_file(os.path.join(folder, f))]
    if not documents:
        raise DataError(folder, "the data files in this folder contain no text")
    return documents


def _load_file(path: str) -> list[str]:
    lower = path.lower()
    if lower.endswith(_JSON_SUFFIXES):
        return _load_json(path)
    if lower.endswith(_PARQUET_SUFFIXES):
        return _load_parquet(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, "file is empty (expected text)")
    return [text]


def _read_text(path: str, expected: str = "UTF-8 text") -> str:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        with opener(path, "rb") as f:
            raise not_utf8(path, f.read(), expected) from None
    except (OSError, EOFError) as e:  # permissions, truncated gzip, ...
        raise DataError(path, f"cannot read file ({e})") from e


def not_utf8(path: str, data: bytes, expected: str) -> DataError:
    """The :class:`DataError` for a file whose bytes ``data`` are not UTF-8: it names the line
    and the first bad byte, and says what the file must be (``expected``)."""
    for number, line in enumerate(data.split(b"\n"), start=1):  # no UTF-8 sequence holds the byte \n
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return DataError(path, f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1} ({e.reason}); "
                                   f"the file must be {expected}", line=number)
    return DataError(path, f"not UTF-8; the file must be {expected}")


def _load_json(path: str) -> list[str]:
    content = _read_text(path, "UTF-8 JSON lines (one JSON object with a 'text' field per line)")
    if not content.strip():
        raise DataError(path, "file is empty (expected one JSON object with a 'text' field per line)")
    if content.lstrip().startswith("["):  # a JSON list, not JSON lines
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON ({e.msg})", e.lineno) from e
        if not isinstance(records, list):
            raise DataError(path, "expected a JSON list of objects with a 'text' field")
        return [text for text in (_record_text(path, r, None) for r in records) if text]
    documents = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                path, f"invalid JSON ({e.msg}); expected one JSON object with a 'text' field per line", number
            ) from e
        text = _record_text(path, record, number)
        if text:
            documents.append(text)
    return documents


def _record_text(path: str, record: Any, line: int | None) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        got = type(record).__name__
        raise DataError(path, f"expected a JSON object with a 'text' field, got {got}", line)
    if "text" not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise DataError(path, f"JSON object has no 'text' field (fields: {keys})", line)
    if not isinstance(record["text"], str):
        raise DataError(path, f"'text' must be a string, got {type(record['text']).__name__}", line)
    return record["text"]


def _load_parquet(path: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(path, "reading parquet files needs pyarrow: `pip install pyarrow`") from e
    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DataError(path, f"parquet file has no 'text' column (columns: {', '.join(schema.names)})")
        column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"cannot read parquet file ({e})") from e
    return [t for t in column if isinstance(t, str) and t]


def _load_hf_dataset(name: str, split: Split) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            name,
            "this dataset needs the Hugging Face `datasets` library and network access "
            "(`pip install datasets`); or pass a local .txt/.jsonl/.parquet file or folder",
        ) from e
    try:
        if name == "wikitext2":
            hf_split = "train" if split == "calibration" else "test"
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            # The usual wikitext-2 protocol: the rows form one text, joined with "\n\n".
            return ["\n\n".join(rows["text"])]
        if split == "calibration":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
            rows = datasets.load_dataset("allenai/c4", data_files=files, split="train")
            return [t for t in rows["text"] if t]
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        rows = datasets.load_dataset("allenai/c4", data_files=files, split="validation")
        return [t for t in rows["text"][:C4_EVAL_DOCUMENTS] if t]
    except Exception as e:  # offline, hub errors, ...: any failure means "not available here"
        reason = f"{type(e).__name__}: {e}"
        raise DataError(name, f"could not load the dataset from Hugging Face ({reason})") from e


# --------------------------------------------------------------------------------------------
# Tokens


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text``, without special tokens, untruncated and without length warnings.

    Args:
      tokenizer: a Hugging Face tokenizer.
      text: any length of text (a whole novel is fine).

    Returns:
      A 1-D ``int32`` array.

    Example:
      >>> tokenize(tokenizer, "Hello world").tolist()
      [19556, 905]
    """
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn text into tokens, and this model has none")
    # verbose=False silences "Token indices sequence length is longer than the specified maximum
    # sequence length": the windows cut later are what the model sees, not this whole text.
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32).reshape(-1)


def calibration_tokens(
    tokenizer,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    bos_id: int | None = None,
    source: str = "<calibration data>",
) -> np.ndarray:
    """Random calibration windows, as SparseGPT and Wanda draw them (docs/design.md §15).

    Repeatedly: draw a random document whose token count is more than ``seqlen``, then a random
    window of ``seqlen`` consecutive tokens inside it (start in ``[0, count - seqlen)``).
    Documents are tokenized once each, without special tokens, when first drawn. The draws use
    ``numpy.random.default_rng(seed)``, so a seed gives the same windows on every run.

    Args:
      tokenizer: a Hugging Face tokenizer.
      documents: texts to draw from (see :func:`load_documents`).
      nsamples: number of windows.
      seqlen: tokens per window.
      seed: random seed.
      bos_id: if given, every window starts with this token followed by ``seqlen - 1`` text
        tokens (for models that need BOS at the start of a sequence, see
        :func:`needs_bos_per_window`).
      source: what the documents are (a file name), for messages.

    Returns:
      ``(nsamples, seqlen)`` ``int32`` token ids. Windows overlap when the text has fewer
      tokens than ``nsamples × seqlen``: that is allowed, with a ``CalibrationWarning`` giving
      the numbers.

    Raises:
      DataError: no document is longer than the window (naming ``source``).

    Example:
      >>> ids = calibration_tokens(tokenizer, load_documents("pydoc-calib"), 128, 2048, seed=0)
      >>> ids.shape, ids.dtype
      ((128, 2048), dtype('int32'))
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    if bos_id is not None and seqlen < 2:
        raise ValueError("seqlen must be at least 2 when each window starts with BOS")
    documents = list(documents)
    if not documents:
        raise DataError(source, "no documents")
    body = seqlen - 1 if bos_id is not None else seqlen
    rng = np.random.default_rng(seed)
    cache: dict[int, np.ndarray] = {}
    long_enough: set[int] = set()
    samples = np.empty((nsamples, seqlen), dtype=np.int32)
    if bos_id is not None:
        samples[:, 0] = bos_id
    for s in range(nsamples):
        while True:
            if len(cache) == len(documents) and not long_enough:
                longest = max(len(ids) for ids in cache.values())
                raise DataError(
                    source,
                    f"no document is longer than a window: the longest has {longest} tokens, "
                    f"windows need more than {body} (seqlen={seqlen}); use a smaller --seqlen "
                    "or longer documents",
                )
            index = int(rng.integers(len(documents)))
            if index not in cache:
                cache[index] = tokenize(tokenizer, documents[index])
                if len(cache[index]) > body:
                    long_enough.add(index)
            if index in long_enough:
                break
        ids = cache[index]
        start = int(rng.integers(len(ids) - body))
        samples[s, seqlen - body :] = ids[start : start + body]
    if len(cache) == len(documents):  # every document was read: is there text for every window?
        available = sum(len(cache[i]) for i in long_enough)
        if available < nsamples * body:
            warnings.warn(
                f"{source}: only {available} tokens of calibration text for {nsamples} windows of "
                f"{body} tokens ({nsamples * body} tokens): the windows overlap, so calibration "
                "sees the same text several times; use more text, fewer --nsamples or a shorter --seqlen",
                CalibrationWarning,
                stacklevel=2,
            )
    return samples


class CalibrationWarning(UserWarning):
    """The calibration text is usable but thinner than asked for (overlapping windows)."""


def evaluation_tokens(tokenizer, documents: str | Iterable[str]) -> np.ndarray:
    """The token stream of the perplexity protocol: documents joined with ``"\\n\\n"``, tokenized once.

    No special tokens are added (windows get BOS later where the model needs it), the text is
    never truncated, and long texts raise no length warning.

    Args:
      tokenizer: a Hugging Face tokenizer.
      documents: one text or several (see :func:`load_documents`).

    Returns:
      A 1-D ``int32`` array of token ids.

    Raises:
      DataError: the documents contain no tokens.

    Example:
      >>> ids = evaluation_tokens(tokenizer, load_documents("pydoc-eval"))
      >>> ids.ndim
      1
    """
    text = documents if isinstance(documents, str) else "\n\n".join(documents)
    ids = tokenize(tokenizer, text)
    if ids.size == 0:
        raise DataError("<evaluation data>", "no tokens in the evaluation text")
    return ids


def needs_bos_per_window(config_or_family: Any) -> bool:
    """Whether perplexity windows (and calibration windows) must start with the BOS token.

    Gemma models give much worse perplexity without BOS at the start of every window (21.8 with,
    61.4 without, docs/design.md §16); LLaMA-family models and GPT-2 are evaluated without it.

    Args:
      config_or_family: a family name (``"llama"``, ``"gpt2"``, ``"gemma3"``), a
        ``transformers`` config, or a :class:`fw_jax.models.LoadedModel`.

    Returns:
      True for Gemma, False otherwise.

    Example:
      >>> needs_bos_per_window("gemma3"), needs_bos_per_window("llama")
      (True, False)
    """
    from fw_jax.models import FAMILIES, family_of

    if isinstance(config_or_family, str):
        family = config_or_family
    elif hasattr(config_or_family, "family") and isinstance(config_or_family.family, str):
        family = config_or_family.family
    else:
        try:
            family = family_of(config_or_family)
        except ValueError:
            return False
    return FAMILIES[family].bos_per_window if family in FAMILIES else False
