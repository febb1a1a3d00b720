"""Our Flax models against transformers + PyTorch on tiny random checkpoints."""

import numpy as np
import pytest
import torch
import transformers
from models_fixtures import random_torch_model, tiny_config, token_ids, torch_logits

import fw_jax.models as fm

FAMILIES = ["llama", "llama3", "qwen2", "mistral", "gpt2", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    config = tiny_config(request.param)
    model = random_torch_model(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def test_logits_match_transformers(checkpoint):
    family, folder, torch_model = checkpoint
    loaded = fm.load_model(folder)
    assert loaded.family == {"gpt2": "gpt2", "gemma3": "gemma3"}.get(family, "llama")
    ids = token_ids()
    ours = np.asarray(fm.logits(loaded.model, ids))
    assert ours.dtype == np.float32
    ref = torch_logits(torch_model, ids)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The eager module call is the same computation.
    np.testing.assert_allclose(np.asarray(loaded.model(ids)), ours, atol=1e-5, rtol=0)


def test_linear_weights_are_hf_weights_as_d_out_d_in(checkpoint):
    family, folder, torch_model = checkpoint
    loaded = fm.load_model(folder)
    state = torch_model.state_dict()
    names = fm.linear_names(loaded.model)
    assert len(names) == torch_model.config.num_hidden_layers * (4 if family == "gpt2" else 7)
    for name in names:
        ref = state[name + ".weight"].numpy()
        if family == "gpt2":  # Conv1D keeps (d_in, d_out)
            ref = ref.T
        np.testing.assert_array_equal(np.asarray(fm.get_linear_weight(loaded.model, name)), ref)


def test_sliding_window_is_applied():
    config = tiny_config("mistral", sliding_window=3)
    torch_model = random_torch_model(config, seed=1)
    loaded = fm.LoadedModel(*_from_state(config, torch_model), family="llama")
    ids = token_ids(length=10)
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def _from_state(config, torch_model):
    from fw_jax.models._loaded import build_abstract_model, fill_model

    model, family = build_abstract_model(config)
    fill_model(
        model,
        family,
        ((k, v.numpy(), "state_dict", str(v.numpy().dtype)) for k, v in torch_model.state_dict().items()),
        "state_dict",
    )
    return model, config, None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_safetensors(family, tmp_path):
    config = tiny_config(family)
    torch_model = random_torch_model(config, seed=2)
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = fm.load_model(tmp_path)
    ids = token_ids()
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_compute_in_float32(dtype, tmp_path):
    config = tiny_config("qwen2")
    random_torch_model(config, seed=3).to(dtype).save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    loaded = fm.load_model(tmp_path)
    name = "model.layers.0.mlp.up_proj"
    assert fm.get_linear_weight(loaded.model, name).dtype == np.float32
    ids = token_ids()
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(reference, ids), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma3"])
def test_save_round_trip_keeps_zeros_and_logits(family, tmp_path):
    config = tiny_config(family)
    random_torch_model(config, seed=4).save_pretrained(tmp_path / "in")
    loaded = fm.load_model(tmp_path / "in")
    rng = np.random.RandomState(0)
    zeroed = {}
    for name in fm.linear_names(loaded.model)[:5]:
        w = np.array(fm.get_linear_weight(loaded.model, name))
        w[rng.rand(*w.shape) < 0.5] = 0.0
        zeroed[name] = w
    fm.set_linear_weights(loaded.model, zeroed)
    ids = token_ids()
    ours = np.asarray(fm.logits(loaded.model, ids))

    out = fm.save_hf_folder(loaded, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)
    state = reloaded.state_dict()
    for name, w in zeroed.items():
        saved = state[name + ".weight"].numpy()
        saved = saved.T if family == "gpt2" else saved
        np.testing.assert_array_equal(saved == 0, w == 0)
    # Our own loader reads it back bit for bit.
    again = fm.load_model(out)
    for name, w in zeroed.items():
        np.testing.assert_array_equal(np.asarray(fm.get_linear_weight(again.model, name)), w)
    # No temporary folders left next to the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    config = tiny_config("llama")
    random_torch_model(config).save_pretrained(tmp_path / "in")
    loaded = fm.load_model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        fm.save_hf_folder(loaded, tmp_path / "out")
    fm.save_hf_folder(loaded, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    config = tiny_config("llama")
    random_torch_model(config).save_pretrained(tmp_path / "in")
    loaded = fm.load_model(tmp_path / "in")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("fw_jax.models._shards.write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        fm.save_hf_folder(loaded, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
