"""Flax msgpack checkpoints (transformers 4.x layout) in and out."""

import numpy as np
import pytest
from flax import serialization
from models_fixtures import random_torch_model, tiny_config, token_ids, torch_logits

import fw_jax.models as fm


def flax_tree_from_torch(torch_model, family):
    """The parameter dict transformers 4.x's PyTorch→Flax conversion produces, written out here."""
    tree = {}
    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and torch_model.config.tie_word_embeddings:
            continue
        parts = name.split(".")
        array = tensor.numpy()
        module, leaf = parts[:-1], parts[-1]
        if module[-1] in ("embed_tokens", "wte", "wpe"):
            leaf = "embedding"
        elif leaf == "weight" and array.ndim == 2:
            leaf, array = "kernel", array.T
        elif family == "gpt2" and module[-1].startswith("ln_") and leaf == "weight":
            leaf = "scale"
        node = tree
        for key in module:
            node = node.setdefault(key, {})
        node[leaf] = array
    return tree


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_msgpack_loads_and_round_trips(family, tmp_path):
    config = tiny_config(family)
    torch_model = random_torch_model(config, seed=8)
    folder = tmp_path / "flax"
    folder.mkdir()
    config.save_pretrained(folder)
    tree = flax_tree_from_torch(torch_model, family)
    if family == "gpt2":
        assert tree["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (3 * 48, 48)
    else:
        assert tree["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].shape == (48, 80)
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))

    loaded = fm.load_model(folder)
    ids = token_ids()
    ours = np.asarray(fm.logits(loaded.model, ids))
    np.testing.assert_allclose(ours, torch_logits(torch_model, ids), atol=1e-4, rtol=0)

    # Prune a little, write back, and read the same nested dict again.
    name = fm.linear_names(loaded.model)[0]
    w = np.array(fm.get_linear_weight(loaded.model, name))
    w[:, ::2] = 0.0
    fm.set_linear_weight(loaded.model, name, w)
    out = fm.save_flax_folder(loaded, tmp_path / "out")
    written = serialization.msgpack_restore((tmp_path / "out" / "flax_model.msgpack").read_bytes())
    expected = dict(serialization.to_state_dict(tree))
    flat_written = dict(_flat(written))
    flat_expected = dict(_flat(expected))
    assert flat_written.keys() == flat_expected.keys()
    changed = tuple(name.split(".")) + ("kernel",)
    for key, value in flat_expected.items():
        if key == changed:
            np.testing.assert_array_equal(
                flat_written[key] == 0, w.T == 0 if family == "llama" else w == 0
            )
        else:
            np.testing.assert_array_equal(flat_written[key], value)
    again = fm.load_model(out)
    np.testing.assert_array_equal(
        np.asarray(fm.logits(again.model, ids)), np.asarray(fm.logits(loaded.model, ids))
    )


def test_base_model_msgpack_without_prefix(tmp_path):
    config = tiny_config("llama", tie_word_embeddings=True)
    torch_model = random_torch_model(config, seed=9)
    config.save_pretrained(tmp_path)
    tree = flax_tree_from_torch(torch_model, "llama")["model"]
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize({"params": tree}))
    loaded = fm.load_model(tmp_path)
    ids = token_ids()
    np.testing.assert_allclose(
        np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def test_corrupted_msgpack(tmp_path):
    config = tiny_config("gpt2")
    config.save_pretrained(tmp_path)
    tree = flax_tree_from_torch(random_torch_model(config), "gpt2")
    data = serialization.msgpack_serialize(tree)
    (tmp_path / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(fm.CheckpointError, match="flax_model.msgpack: corrupted or truncated"):
        fm.load_model(tmp_path)
    del tree["transformer"]["h"]["1"]["mlp"]
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(
        fm.CheckpointError, match="flax_model.msgpack: missing tensors: transformer.h.1.mlp"
    ):
        fm.load_model(tmp_path)


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), np.asarray(v)
