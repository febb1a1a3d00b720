"""Qwen3, Gemma 2 and Phi-3 against transformers + PyTorch on tiny random checkpoints, and pruned
end to end through the command line."""

import json

import numpy as np
import pytest
import torch
import transformers
from models_fixtures import VOCAB, folder_tensors, random_torch_model, token_ids, torch_logits
from test_pipeline_data import char_tokenizer
from test_pipeline_evaluate import DOCUMENTS, torch_perplexity

import fw_jax.models as fm
from fw_jax.cli import main as cli_main
from fw_jax.pipeline.evaluate import evaluate_perplexity

COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LENGTH = 12  # longer than every sliding window below and than phi3's original_max_position_embeddings


def config_2026(name: str, **overrides):
    """A tiny config of one of the families of this file; each exercises what sets it apart."""
    if name == "qwen3":  # layers 1 and 2 slide (window 5), untied head
        cfg = dict(COMMON, head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                   tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        return transformers.Qwen3Config(**{**cfg, **overrides})
    if name == "qwen3-bias":  # attention_bias on q/k/v/o, tied head, no sliding window
        cfg = dict(COMMON, num_hidden_layers=2, head_dim=12, attention_bias=True, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return transformers.Qwen3Config(**{**cfg, **overrides})
    if name == "gemma2":  # layers 0 and 2 slide (even/odd rule, no layer_types); caps that bite
        cfg = dict(COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                   final_logit_softcapping=3.0, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        return transformers.Gemma2Config(**{**cfg, **overrides})
    if name == "phi3":  # Phi-4-mini's shape: longrope, partial rotary, tied head, a window
        rope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 3.0, 5.0], "original_max_position_embeddings": 8}
        cfg = dict(COMMON, sliding_window=7, tie_word_embeddings=True, rope_parameters=rope,
                   original_max_position_embeddings=8)  # transformers reads it here, not from the rope dict
        return transformers.Phi3Config(**{**cfg, **overrides})
    if name == "phi3-default":  # Phi-3-mini's shape: full rotary, as many kv heads as heads
        cfg = dict(COMMON, num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0})
        return transformers.Phi3Config(**{**cfg, **overrides})
    raise ValueError(name)


NAMES = ["qwen3", "qwen3-bias", "gemma2", "phi3", "phi3-default"]
FAMILY = {"qwen3": "llama", "qwen3-bias": "llama", "gemma2": "gemma2", "phi3": "phi3", "phi3-default": "phi3"}


@pytest.fixture(scope="module", params=NAMES)
def checkpoint(request, tmp_path_factory):
    model = random_torch_model(config_2026(request.param), seed=5)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return request.param, folder, model


def test_logits_match_transformers(checkpoint):
    name, folder, torch_model = checkpoint
    loaded = fm.load_model(folder)
    assert loaded.family == FAMILY[name]
    for length in (5, LENGTH):
        ids = token_ids(length=length, seed=length)
        ours = np.asarray(fm.logits(loaded.model, ids))
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(loaded.model(ids)), ours, atol=1e-5, rtol=0)


def test_perplexity_matches_transformers(checkpoint):
    name, folder, torch_model = checkpoint
    tokenizer = char_tokenizer()
    ids = np.asarray(tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"])
    ours = evaluate_perplexity({name: str(folder)}, DOCUMENTS, seqlen=LENGTH, progress=False)[name]
    bos = tokenizer.bos_token_id if name == "gemma2" else None  # Gemma windows start with BOS
    assert ours == pytest.approx(torch_perplexity(torch_model, ids, LENGTH, bos_id=bos), rel=1e-4)


def test_parameters_are_the_checkpoint_tensors_by_name(checkpoint):
    name, folder, torch_model = checkpoint
    loaded = fm.load_model(folder)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    if torch_model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    assert set(fm.param_names(loaded.model)) == set(state)
    for param in fm.param_names(loaded.model):
        np.testing.assert_array_equal(np.asarray(fm.get_param(loaded.model, param)), state[param])
    layers = fm.block_linears(loaded.model, 1)
    if name.startswith("phi3"):  # the fused linears, as stored, each its own input
        assert [(l.name, l.input_key) for l in layers] == [
            ("model.layers.1.self_attn.qkv_proj", "model.layers.1.attn_in"),
            ("model.layers.1.self_attn.o_proj", "model.layers.1.attn_out"),
            ("model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp_in"),
            ("model.layers.1.mlp.down_proj", "model.layers.1.mlp_mid")]
        c = torch_model.config
        assert layers[0].weight.shape == ((c.num_attention_heads + 2 * c.num_key_value_heads) * 12, 48)
        assert layers[2].weight.shape == (2 * 80, 48)
    else:
        assert len(layers) == 7
    # Every linear input is what its Gram matrix is built from: x of shape (..., d_in).
    hidden = fm.embed(loaded.model, token_ids(length=6))
    grams = fm.block_grams(loaded.model, 1, hidden)
    for layer in layers:
        assert grams[layer.input_key].shape == (layer.weight.shape[1],) * 2


def _variant(torch_model, **changes):
    """The same weights under a config with ``changes``."""
    config = torch_model.config.to_dict()
    config.update(changes)
    config = type(torch_model.config).from_dict(config)
    other = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    other.load_state_dict(torch_model.state_dict())
    return other


def _max_difference(a, b, ids) -> float:
    return float(np.abs(torch_logits(a, ids) - torch_logits(b, ids)).max())


@pytest.mark.parametrize("name, changes", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=64)),
    ("qwen3", dict(use_sliding_window=False, layer_types=None)),
    ("phi3", dict(sliding_window=None)),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0})),
])
def test_the_parity_configs_exercise_each_feature(name, changes):
    """Turning a feature off changes transformers' logits on the parity tests' sequences, so the
    parity tests would fail if fw_jax left it out."""
    torch_model = random_torch_model(config_2026(name), seed=5)
    assert _max_difference(torch_model, _variant(torch_model, **changes), token_ids(length=LENGTH)) > 1e-2


def test_phi3_longrope_switches_factors_past_the_original_length():
    """A sequence longer than original_max_position_embeddings uses the long factors from its
    first position on, as transformers does; ours agrees on both sides of the switch."""
    torch_model = random_torch_model(config_2026("phi3"), seed=5)
    loaded = fm.LoadedModel(*_from_state(torch_model), family="phi3")
    long_ids = token_ids(length=LENGTH)
    short_ids = long_ids[:, :8]
    ours_long = np.asarray(fm.logits(loaded.model, long_ids))
    ours_short = np.asarray(fm.logits(loaded.model, short_ids))
    np.testing.assert_allclose(ours_short, torch_logits(torch_model, short_ids), atol=1e-4, rtol=0)
    assert np.abs(ours_long[:, :8] - ours_short).max() > 1e-2


def _from_state(torch_model):
    from fw_jax.models._loaded import build_abstract_model, fill_model

    model, family = build_abstract_model(torch_model.config)
    fill_model(model, family, ((k, v.numpy(), "state_dict", "float32") for k, v in torch_model.state_dict().items()
                               if k != "lm_head.weight" or not torch_model.config.tie_word_embeddings), "state_dict")
    return model, torch_model.config, None


# --- pruned end to end through the command line ---------------------------------------------------

CALIB_TEXT = " ".join(DOCUMENTS) * 40


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, methods", [
    ("qwen3", ("wanda", "sparsefw")), ("gemma2", ("wanda",)), ("phi3", ("wanda",)),
    pytest.param("gemma2", ("sparsefw",), marks=pytest.mark.slow, id="gemma2-sparsefw"),
    pytest.param("phi3", ("sparsefw",), marks=pytest.mark.slow, id="phi3-sparsefw"),
])
def test_cli_prune_keeps_names_dtypes_and_exact_row_budgets(name, methods, calib_file, tmp_path, capsys):
    """Every family through the command line (sparsefw's solve is the same for all: one family
    in the default run, the others with -m slow)."""
    folder = tmp_path / "dense"
    torch_model = random_torch_model(config_2026(name), seed=6)
    torch_model.to(torch.bfloat16).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    dense = folder_tensors(folder)
    for method, extra in [(m, ["--max-iter", "5"] if m == "sparsefw" else []) for m in methods]:
        out = tmp_path / method
        code = cli_main(["prune", str(folder), "--method", method, "--sparsity", "0.5", "--out", str(out),
                         "--calib", calib_file, "--nsamples", "4", "--seqlen", "16", "-q", *extra])
        assert code == 0
        pruned = folder_tensors(out)
        assert set(pruned) == set(dense)
        assert {k: v.dtype for k, v in pruned.items()} == {k: v.dtype for k, v in dense.items()}
        linears = [k for k, v in dense.items() if v.ndim == 2 and k.startswith("model.layers.")]
        assert len(linears) == config_2026(name).num_hidden_layers * (4 if name == "phi3" else 7)
        for key, value in pruned.items():
            if key in linears:  # exactly half of every row's inputs, the rest unchanged
                zeros = (np.asarray(value, np.float32) == 0).sum(axis=1)
                assert np.all(zeros == value.shape[1] // 2), key
                kept = value != 0
                np.testing.assert_array_equal(value[kept], dense[key][kept])
            else:  # embeddings, norms: untouched
                np.testing.assert_array_equal(value.view(np.uint16), dense[key].view(np.uint16))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours = fm.load_model(out)
        ids = token_ids(length=LENGTH)
        np.testing.assert_allclose(np.asarray(fm.logits(ours.model, ids)), torch_logits(reloaded, ids),
                                   atol=1e-4, rtol=0)
    capsys.readouterr()
    assert cli_main(["eval", str(folder), str(out), "--data", calib_file, "--seqlen", "16", "--max-windows", "4"]) == 0
    assert "ppl" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["method"] == methods[-1]  # the last run's
    assert {layer["name"] for layer in report["layers"]} == {k[: -len(".weight")] for k in linears}


# --- what is refused --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["phimoe", "no_such_model"])
def test_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones(model_type, tmp_path):
    folder = tmp_path / "m"
    random_torch_model(config_2026("qwen3-bias"), seed=7).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(fm.UnsupportedModelError) as error:
        fm.load_model(folder)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "config.json"))
    assert f"model_type={model_type!r}" in message
    supported = message.split("supported: ")[1].split(", ")
    assert {"llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(supported)
    assert set(supported) == {t for family in fm.FAMILIES.values() for t in family.model_types}


def test_unsupported_rope_types_are_refused_by_name(tmp_path):
    from fw_jax.models._loaded import build_abstract_model

    phi3 = config_2026("phi3-default")
    phi3.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 1.0}
    with pytest.raises(fm.UnsupportedModelError, match="config.json: phi3 rope_type 'dynamic' is not supported"):
        build_abstract_model(phi3, tmp_path / "config.json")
    gemma2 = config_2026("gemma2", rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(fm.UnsupportedModelError, match="config.json: rope_type 'yarn' is not supported"):
        build_abstract_model(gemma2, tmp_path / "config.json")


def test_gemma2_layer_types_decide_the_sliding_layers():
    """An explicit layer_types list wins over the even/odd rule."""
    config = config_2026("gemma2", layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    spec = fm.Gemma2Spec.from_hf(config)
    assert spec.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert fm.Gemma2Spec.from_hf(config_2026("gemma2")).layer_types == (
        "sliding_attention", "full_attention", "sliding_attention")
    torch_model = random_torch_model(config, seed=8)
    loaded = fm.LoadedModel(*_from_state(torch_model), family="gemma2")
    ids = token_ids(length=LENGTH)
    np.testing.assert_allclose(np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids),
                               atol=1e-4, rtol=0)
