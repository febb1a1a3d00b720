"""Tests of fw_jax.pipeline.data: document loading, calibration windows, evaluation tokens."""

from __future__ import annotations

import gzip
import json
import logging
import os
import string
import sys
import warnings

import numpy as np
import pytest
import transformers

from fw_jax.pipeline.data import (
    DataError,
    calibration_tokens,
    evaluation_tokens,
    load_documents,
    needs_bos_per_window,
    pydoc_text,
)

CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def char_tokenizer(model_max_length: int = 1 << 30):
    """A character-level Hugging Face tokenizer with 100 ids: <unk>=0, <s>=1, </s>=2, then characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m): . matches \n
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


# --- load_documents -------------------------------------------------------------------------


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\nSecond line.\n", encoding="utf-8")
    assert load_documents(tmp_path / "a.txt") == ["First line.\nSecond line.\n"]


def test_folder_reads_sorted_files_of_every_kind(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "sea 1"}\n\n{"text": "sea 2", "url": "x"}\n', encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not data", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    assert load_documents(tmp_path) == ["ay", "bee", "sea 1", "sea 2"]


def test_list_of_sources_concatenates(tmp_path):
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    (tmp_path / "b.txt").write_text("two", encoding="utf-8")
    assert load_documents([tmp_path / "b.txt", str(tmp_path / "a.txt")]) == ["two", "one"]


def test_jsonl_gz_and_json_list(tmp_path):
    with gzip.open(tmp_path / "c4.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped", "timestamp": 1}) + "\n")
    assert load_documents(tmp_path / "c4.json.gz") == ["zipped"]
    (tmp_path / "list.json").write_text(json.dumps([{"text": "x"}, "y", {"text": ""}]), encoding="utf-8")
    assert load_documents(tmp_path / "list.json") == ["x", "y"]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("no_text.jsonl", '{"text": "ok"}\n{"body": "no"}\n', r"no_text\.jsonl:2: .*no 'text' field.*'body'"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
        ("number.jsonl", '{"text": 3}\n', r"number\.jsonl:1: 'text' must be a string"),
        ("array.jsonl", '[1, 2\n', r"array\.jsonl:2: invalid JSON"),
        ("empty.txt", "  \n", r"empty\.txt: file is empty"),
        ("empty.jsonl", "", r"empty\.jsonl: file is empty"),
    ],
)
def test_bad_files_raise_data_error_naming_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        load_documents(tmp_path / name)


def test_unreadable_and_missing_sources(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:1: not UTF-8: byte 0xe9 at column 4"):
        load_documents(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_documents(tmp_path / "empty_dir")
    assert issubclass(DataError, ValueError)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d\.parquet: .*pip install pyarrow"):
        load_documents(tmp_path / "d.parquet")


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", None, "p2"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert load_documents(tmp_path / "d.parquet") == ["p1", "p2"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="no 'text' column.*body"):
        load_documents(tmp_path / "e.parquet")


def test_hf_dataset_names_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    for name in ("c4", "wikitext2"):
        with pytest.raises(DataError, match=rf"^{name}: .*pip install datasets"):
            load_documents(name, split="evaluation")


def test_pydoc_parts_are_disjoint_and_cover_the_topics():
    from pydoc_data.topics import topics

    calib, held_out = load_documents("pydoc-calib"), load_documents("pydoc-eval")
    assert len(calib) == len(held_out) == 1
    assert load_documents("pydoc", split="evaluation") == held_out == [pydoc_text("evaluation")]
    # Walk the topics in sorted order: each one must be the next piece of exactly one part.
    rest = {"calib": calib[0], "eval": held_out[0]}
    counts = {"calib": 0, "eval": 0}
    for key in sorted(topics):
        text = topics[key].strip()
        owners = [p for p in rest if rest[p] == text or rest[p].startswith(text + "\n\n")]
        assert len(owners) == 1, key
        rest[owners[0]] = rest[owners[0]][len(text) + 2 :]
        counts[owners[0]] += 1
    assert rest == {"calib": "", "eval": ""}
    assert counts["calib"] > 0 and counts["eval"] > 0
    share = len(held_out[0]) / (len(held_out[0]) + len(calib[0]))
    assert 0.15 < share < 0.25


# --- tokens ---------------------------------------------------------------------------------


def test_calibration_windows_follow_the_protocol(tokenizer):
    # The first document has exactly seqlen tokens: it is not "longer than seqlen", never drawn.
    documents = ["ZYXWVUTSRQPO", "a" * 5 + string.ascii_lowercase * 3, "0123456789" * 4]
    ids = calibration_tokens(tokenizer, documents, nsamples=40, seqlen=12, seed=3)
    assert ids.shape == (40, 12) and ids.dtype == np.int32
    streams = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    drawn = set()
    for window in ids.tolist():
        # Every window is consecutive tokens of one document longer than seqlen.
        owners = [i for i, s in enumerate(streams) if any(s[j : j + 12] == window for j in range(len(s) - 11))]
        assert len(owners) == 1 and owners[0] != 0
        drawn.add(owners[0])
    assert drawn == {1, 2}
    assert len({tuple(w) for w in ids.tolist()}) > 10  # windows start at random places
    np.testing.assert_array_equal(ids, calibration_tokens(tokenizer, documents, 40, 12, seed=3))
    assert not np.array_equal(ids, calibration_tokens(tokenizer, documents, 40, 12, seed=4))


def test_calibration_windows_with_bos(tokenizer):
    ids = calibration_tokens(tokenizer, ["abcdefghij" * 3], nsamples=5, seqlen=8, bos_id=1)
    assert (ids[:, 0] == 1).all() and (ids[:, 1:] > 2).all()


def test_calibration_tokenizes_each_document_once():
    calls = []
    tok = char_tokenizer()

    class Counting:
        def __call__(self, text, **kwargs):
            calls.append(text)
            return tok(text, **kwargs)

    documents = ["x" * 30, "y" * 40, "z" * 3]
    calibration_tokens(Counting(), documents, nsamples=50, seqlen=10)
    assert sorted(calls) == sorted(set(calls)) and len(calls) <= 3


def test_calibration_documents_too_short(tokenizer):
    with pytest.raises(DataError, match=r"longest has 10 tokens.*more than 10 \(seqlen=10\)"):
        calibration_tokens(tokenizer, ["abc", "abcdef", "abcdefghij"], nsamples=2, seqlen=10)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_evaluation_tokens_join_without_special_tokens_or_truncation():
    recorder = _Recorder()
    logging.getLogger("transformers").addHandler(recorder)  # transformers logs, it does not warn
    tok = char_tokenizer(model_max_length=8)
    long_text = "Emma Woodhouse, handsome, clever, and rich. " * 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = evaluation_tokens(tok, [long_text, "end"])
    assert ids.ndim == 1 and ids.dtype == np.int32
    assert len(ids) == len(long_text) + 2 + 3  # one token per character, nothing cut or added
    assert tok.decode(ids.tolist()) == long_text + "\n\nend"
    assert calibration_tokens(tok, [long_text], nsamples=2, seqlen=16).shape == (2, 16)
    try:
        assert recorder.messages == []
        tok("a" * 100)  # the warning the functions above avoid
        assert any("longer than the specified maximum" in m for m in recorder.messages)
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
    with pytest.raises(DataError, match="no tokens"):
        evaluation_tokens(tok, [""])


def test_needs_bos_per_window():
    assert needs_bos_per_window("gemma3")
    assert needs_bos_per_window(transformers.Gemma3TextConfig())
    assert not needs_bos_per_window("llama")
    assert not needs_bos_per_window(transformers.LlamaConfig())
    assert not needs_bos_per_window(transformers.GPT2Config())


# --- the real SmolLM2 tokenizer (slow: loading it from the GGUF takes ~20 s) ------------------

CORPORA = os.environ.get(
    "FW_JAX_CORPORA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpora")
)


@pytest.mark.slow
def test_smollm2_tokenizer_on_a_novel_and_pydoc():
    from fw_jax.models import smollm2_gguf_path
    from fw_jax.models._hf import load_tokenizer

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = load_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path))
    recorder = _Recorder()
    logging.getLogger("transformers").addHandler(recorder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            held_out = evaluation_tokens(tok, load_documents("pydoc-eval"))
            calib = calibration_tokens(tok, load_documents("pydoc-calib"), nsamples=8, seqlen=2048)
            novel = os.path.join(CORPORA, "austen_emma.txt")
            if os.path.exists(novel):
                text = load_documents(novel)[0]
                assert len(text) > 800_000
                ids = evaluation_tokens(tok, [text])
                assert len(ids) > 150_000 and tok.decode(ids[-50:].tolist()) in text
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
    assert recorder.messages == []
    assert len(held_out) // 2048 >= 8  # enough evaluation windows of 2048 tokens
    assert calib.shape == (8, 2048) and tok.bos_token_id not in held_out[:1].tolist()
