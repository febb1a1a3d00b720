"""The block-by-block converter API: linears, Gram matrices, write-back, pruned forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from models_fixtures import random_torch_model, tiny_config, token_ids, torch_logits

import fw_jax.models as fm


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = random_torch_model(tiny_config(request.param), seed=7)
    torch_model.save_pretrained(folder)
    return fm.load_model(folder), torch_model


def test_block_by_block_equals_full_forward(loaded):
    lm, torch_model = loaded
    ids = token_ids(batch=3, length=9)
    h = fm.embed(lm.model, ids)
    for b in range(fm.num_blocks(lm.model)):
        h = fm.run_block(lm.model, b, h, batch_size=2)
    np.testing.assert_allclose(
        np.asarray(fm.head(lm.model, h)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def test_gemma3_block_by_block_and_grams(tmp_path):
    # Gemma's blocks take a per-layer-type RoPE context; the same API must work unchanged.
    torch_model = random_torch_model(tiny_config("gemma3"), seed=7)
    torch_model.save_pretrained(tmp_path)
    model = fm.load_model(tmp_path).model
    ids = token_ids(batch=2, length=9)
    h = fm.embed(model, ids)
    for b in range(fm.num_blocks(model)):
        if b == 2:  # the global-attention layer
            grams = fm.block_grams(model, b, h)
            inputs = fm.block_inputs(model, b, h)
            x = np.asarray(inputs["model.layers.2.mlp_in"], np.float64).reshape(-1, 48)
            np.testing.assert_allclose(
                np.asarray(grams["model.layers.2.mlp_in"]), x.T @ x, rtol=1e-4, atol=1e-4
            )
        h = fm.run_block(model, b, h)
    np.testing.assert_allclose(
        np.asarray(fm.head(model, h)), torch_logits(torch_model, ids), atol=1e-4, rtol=0
    )


def test_linear_groups_share_inputs(loaded):
    lm, _ = loaded
    layers = fm.block_linears(lm.model, 1)
    prefix = "transformer.h.1" if lm.family == "gpt2" else "model.layers.1"
    keys = {
        layer.name.removeprefix(prefix + "."): layer.input_key.removeprefix(prefix + ".")
        for layer in layers
    }
    if lm.family != "gpt2":
        assert keys == {
            "self_attn.q_proj": "attn_in",
            "self_attn.k_proj": "attn_in",
            "self_attn.v_proj": "attn_in",
            "self_attn.o_proj": "attn_out",
            "mlp.gate_proj": "mlp_in",
            "mlp.up_proj": "mlp_in",
            "mlp.down_proj": "mlp_mid",
        }
    else:
        assert keys == {
            "attn.c_attn": "attn_in",
            "attn.c_proj": "attn_out",
            "mlp.c_fc": "mlp_in",
            "mlp.c_proj": "mlp_mid",
        }
    for layer in layers:
        assert layer.weight.shape == fm.get_linear_weight(lm.model, layer.name).shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_grams_equal_xtx_of_captured_inputs(loaded, dtype):
    lm, _ = loaded
    h = fm.embed(lm.model, token_ids(batch=5, length=7, seed=1))
    h = fm.run_block(lm.model, 0, h)
    grams = fm.block_grams(lm.model, 1, h, batch_size=2, dtype=dtype)  # 3 uneven mini-batches
    inputs = fm.block_inputs(lm.model, 1, h)
    assert set(grams) == set(inputs) == {layer.input_key for layer in fm.block_linears(lm.model, 1)}
    for key, gram in grams.items():
        assert gram.dtype == dtype
        x = np.asarray(inputs[key], dtype=np.float64).reshape(-1, inputs[key].shape[-1])
        xtx = x.T @ x
        np.testing.assert_allclose(
            np.asarray(gram, np.float64), xtx, rtol=1e-4, atol=1e-4 * np.abs(xtx).max()
        )
    for layer in fm.block_linears(lm.model, 1):
        assert grams[layer.input_key].shape == (layer.weight.shape[1],) * 2


def test_grams_from_an_iterable_of_batches(loaded):
    lm, _ = loaded
    h = fm.embed(lm.model, token_ids(batch=4, length=6, seed=2))
    whole = fm.block_grams(lm.model, 0, h, batch_size=None)
    pieces = fm.block_grams(lm.model, 0, iter([h[:1], h[1:]]))
    for key in whole:
        np.testing.assert_allclose(
            np.asarray(pieces[key]), np.asarray(whole[key]), rtol=1e-5, atol=1e-4
        )


def test_gram_step_compiles_once_for_all_blocks(loaded):
    from fw_jax.models import _calibration

    lm, _ = loaded
    h = fm.embed(lm.model, token_ids(batch=2, length=5, seed=3))
    fm.block_grams(lm.model, 0, h)
    before = _calibration._gram_step._cache_size()
    fm.block_grams(lm.model, 1, h)
    assert _calibration._gram_step._cache_size() == before


def test_pruned_weights_written_back_change_the_block(loaded):
    lm, _ = loaded
    h = fm.embed(lm.model, token_ids(batch=2, length=6, seed=4))
    layers = fm.block_linears(lm.model, 0)
    originals = {layer.name: layer.weight for layer in layers}
    dense_out = fm.run_block(lm.model, 0, h)
    try:
        grams = fm.block_grams(lm.model, 0, h)
        pruned = {
            layer.name: jnp.where(
                jnp.abs(layer.weight) < jnp.median(jnp.abs(layer.weight)), 0.0, layer.weight
            )
            for layer in layers
        }
        fm.set_linear_weights(lm.model, pruned)
        for layer in fm.block_linears(lm.model, 0):
            np.testing.assert_array_equal(np.asarray(layer.weight), np.asarray(pruned[layer.name]))
        pruned_out = fm.run_block(lm.model, 0, h)
        assert not np.allclose(np.asarray(pruned_out), np.asarray(dense_out))
        # The layer error predicted by the Gram matrix is the output change of that layer.
        l0 = layers[0]
        inputs = fm.block_inputs(lm.model, 0, h)[l0.input_key].reshape(-1, l0.weight.shape[1])
        r = np.asarray(l0.weight - pruned[l0.name], np.float64)
        direct = np.sum((np.asarray(inputs, np.float64) @ r.T) ** 2)
        via_gram = np.trace(r @ np.asarray(grams[l0.input_key], np.float64) @ r.T)
        np.testing.assert_allclose(via_gram, direct, rtol=1e-4)
    finally:
        fm.set_linear_weights(lm.model, originals)


def test_bad_inputs_are_rejected(loaded):
    lm, _ = loaded
    with pytest.raises(ValueError, match="float32 or float64"):
        fm.block_grams(lm.model, 0, jnp.zeros((1, 3, 48), jnp.float32), dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"\(N, T, d\)"):
        fm.block_grams(lm.model, 0, jnp.zeros((3, 48), jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        fm.set_linear_weight(lm.model, fm.linear_names(lm.model)[0], jnp.zeros((2, 2)))
    with pytest.raises(KeyError):
        fm.get_linear_weight(lm.model, "model.layers.0.no_such_proj")
