"""Tests of fw_jax.pipeline.evaluate: the perplexity protocol against transformers + PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models_fixtures import random_torch_model, tiny_config
from test_pipeline_data import char_tokenizer

import fw_jax.models as fm
from fw_jax.pipeline.evaluate import evaluate_perplexity, format_table

SEQLEN = 16
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)
DOCUMENTS = [TEXT, "However little known the feelings or views of such a man may be."]


def torch_perplexity(model, ids: np.ndarray, seqlen: int, bos_id: int | None = None) -> float:
    """Independent reference: windows, transformers logits, torch cross-entropy."""
    body = seqlen - 1 if bos_id is not None else seqlen
    n = len(ids) // body
    windows = torch.as_tensor(ids[: n * body].reshape(n, body), dtype=torch.long)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="mean"
    )
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random LLaMA saved as a Hugging Face folder with a character tokenizer, and its torch twin."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = tiny_config("llama")
    torch_model = random_torch_model(config, seed=1)
    torch_model.save_pretrained(folder)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(folder)
    return folder, torch_model, tokenizer


def test_perplexity_matches_torch_cross_entropy(tiny_llama):
    folder, torch_model, tokenizer = tiny_llama
    ids = np.asarray(tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"])
    assert len(ids) % SEQLEN != 0  # the dropped tail is exercised
    ours = evaluate_perplexity({"tiny": str(folder)}, DOCUMENTS, seqlen=SEQLEN)
    assert list(ours) == ["tiny"]
    expected = torch_perplexity(torch_model, ids, SEQLEN)
    assert ours["tiny"] == pytest.approx(expected, rel=1e-4)

    with_bos = evaluate_perplexity({"tiny": str(folder)}, DOCUMENTS, seqlen=SEQLEN, bos_per_window=True)
    expected_bos = torch_perplexity(torch_model, ids, SEQLEN, bos_id=tokenizer.bos_token_id)
    assert with_bos["tiny"] == pytest.approx(expected_bos, rel=1e-4)
    assert with_bos["tiny"] != pytest.approx(ours["tiny"], rel=1e-4)


def test_several_models_max_windows_and_loaded_models(tiny_llama):
    folder, torch_model, tokenizer = tiny_llama
    loaded = fm.load_model(folder)
    ids = np.asarray(tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"])
    results = evaluate_perplexity({"b": loaded, "a": folder}, DOCUMENTS, seqlen=SEQLEN, max_windows=2)
    assert list(results) == ["b", "a"] and results["a"] == results["b"]
    assert results["a"] == pytest.approx(torch_perplexity(torch_model, ids[: 2 * SEQLEN], SEQLEN), rel=1e-4)


def test_model_without_tokenizer(tiny_llama):
    folder, _, tokenizer = tiny_llama
    bare = fm.load_model(folder, tokenizer=False)
    with pytest.raises(ValueError, match="has no tokenizer"):
        evaluate_perplexity({"bare": bare}, DOCUMENTS, seqlen=SEQLEN)
    given = evaluate_perplexity({"bare": bare}, DOCUMENTS, seqlen=SEQLEN, tokenizer=tokenizer)
    assert math.isfinite(given["bare"])


def test_gemma_gets_bos_per_window_by_default(tmp_path):
    config = tiny_config("gemma3")
    torch_model = random_torch_model(config, seed=2)
    torch_model.save_pretrained(tmp_path)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    ids = np.asarray(tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"])
    ours = evaluate_perplexity({"gemma": tmp_path}, DOCUMENTS, seqlen=SEQLEN)
    expected = torch_perplexity(torch_model, ids, SEQLEN, bos_id=tokenizer.bos_token_id)
    assert ours["gemma"] == pytest.approx(expected, rel=1e-4)
    without = evaluate_perplexity({"gemma": tmp_path}, DOCUMENTS, seqlen=SEQLEN, bos_per_window=False)
    assert without["gemma"] == pytest.approx(torch_perplexity(torch_model, ids, SEQLEN), rel=1e-4)


def test_errors(tiny_llama):
    folder, _, _ = tiny_llama
    with pytest.raises(ValueError, match="less than one window"):
        evaluate_perplexity({"tiny": folder}, ["short"], seqlen=SEQLEN)
    with pytest.raises(ValueError, match="longer than model 'tiny' supports"):
        evaluate_perplexity({"tiny": folder}, DOCUMENTS, seqlen=128)


def test_format_table():
    table = format_table({
        "dense": {"pydoc-eval": 21.304, "persuasion": 18.0},
        "wanda 50%": {"pydoc-eval": 27.9},
        "broken": {"persuasion": float("inf")},
    })
    assert table.splitlines() == [
        "| model     | pydoc-eval | persuasion |",
        "|:----------|-----------:|-----------:|",
        "| dense     |      21.30 |      18.00 |",
        "| wanda 50% |      27.90 |          - |",
        "| broken    |          - |        inf |",
    ]
