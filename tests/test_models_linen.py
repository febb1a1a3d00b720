"""Generic linen path: Dense kernels by parameter path, inputs captured under jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fw_jax.models as fm


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "in_0", x)
        h = nn.relu(nn.Dense(12, name="up")(x))
        self.sow("intermediates", "in_1", h)
        return nn.Dense(5, name="down")(h)


class Block(nn.Module):
    d: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, h):
        x = nn.LayerNorm()(h)
        self.sow("intermediates", "qkv_in", x)
        q, k, v = (nn.Dense(self.d, use_bias=False, name=n)(x) for n in ("q", "k", "v"))
        att = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(self.d)
        att = jnp.where(jnp.tril(jnp.ones(att.shape[-2:], bool)), att, -1e9)
        a = jnp.einsum("bts,bsd->btd", jax.nn.softmax(att, -1), v)
        self.sow("intermediates", "o_in", a)
        h = h + nn.Dense(self.d, name="o")(a)
        x = nn.LayerNorm()(h)
        self.sow("intermediates", "mlp_in", x)
        return h + nn.Dense(self.d, name="proj")(x) + MLP(name="mlp")(x).sum(-1, keepdims=True)


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(17, 8)(ids)
        for i in range(2):
            h = Block(name=f"block_{i}")(h)
        return nn.Dense(17, name="head")(h)


def _capturer(module):
    """Jitted ``(params, x) -> sown intermediates``: the independent record of layer inputs."""
    return jax.jit(
        lambda params, x: module.apply({"params": params}, x, mutable=["intermediates"])[1][
            "intermediates"
        ]
    )


def test_mlp_grams_equal_xtx():
    module = MLP()
    xs = [jax.random.normal(jax.random.key(i), (3, 6, 7), jnp.float32) for i in range(3)]
    params = jax.jit(module.init)(jax.random.key(0), xs[0])["params"]
    names = [layer.name for layer in fm.linen_linears(params)]
    assert names == ["down", "up"] or sorted(names) == ["down", "up"]
    shapes = {layer.name: layer.weight.shape for layer in fm.linen_linears(params)}
    assert shapes == {"up": (12, 7), "down": (5, 12)}
    grams = fm.linen_grams(module, params, xs)
    captured = [_capturer(module)(params, b) for b in xs]
    for name, key in (("up", "in_0"), ("down", "in_1")):
        x = np.concatenate([np.asarray(c[key][0]).reshape(-1, shapes[name][1]) for c in captured])
        np.testing.assert_allclose(np.asarray(grams[name]), x.T @ x, rtol=1e-5, atol=1e-4)


def test_transformer_grams_shared_inputs_and_write_back():
    module = TinyLM()
    batches = [jax.random.randint(jax.random.key(i), (2, 5), 0, 17) for i in range(2)]
    params = jax.jit(module.init)(jax.random.key(1), batches[0])
    layers = {layer.name: layer.weight for layer in fm.linen_linears(params)}
    assert "block_0/q" in layers and "block_1/mlp/up" in layers and "head" in layers
    grams = fm.linen_grams(module, params, batches, dtype=jnp.float64)
    assert set(grams) == set(layers)
    captured_all = [_capturer(module)(params["params"], x) for x in batches]
    for b in range(2):
        captured = [c[f"block_{b}"] for c in captured_all]
        for layer, key in (
            ("q", "qkv_in"),
            ("k", "qkv_in"),
            ("v", "qkv_in"),
            ("o", "o_in"),
            ("proj", "mlp_in"),
        ):
            x = np.concatenate([np.asarray(c[key][0], np.float64).reshape(-1, 8) for c in captured])
            assert grams[f"block_{b}/{layer}"].dtype == jnp.float64
            np.testing.assert_allclose(
                np.asarray(grams[f"block_{b}/{layer}"]), x.T @ x, rtol=1e-5, atol=1e-5
            )
    np.testing.assert_allclose(np.asarray(grams["block_0/q"]), np.asarray(grams["block_0/k"]))

    w = np.array(layers["block_1/o"])
    w[:, :4] = 0.0
    new = fm.set_linen_linears(params, {"block_1/o": w})
    assert set(new) == {"params"}
    np.testing.assert_array_equal(np.asarray(new["params"]["block_1"]["o"]["kernel"]), w.T)
    np.testing.assert_array_equal(
        np.asarray(params["params"]["block_1"]["o"]["kernel"]), layers["block_1/o"].T
    )
    forward = jax.jit(module.apply)
    assert not np.allclose(forward(new, batches[0]), forward(params, batches[0]))
    with pytest.raises(ValueError, match="does not fit"):
        fm.set_linen_linears(params, {"block_1/o": w[:, :3]})
    with pytest.raises(KeyError):
        fm.set_linen_linears(params, {"block_9/o": w})


class Conv1D(nn.Module):
    """transformers' FlaxConv1D layout: kernel (d_out, d_in)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(), (self.features, x.shape[-1]))
        return x @ kernel.T


def test_out_in_kernels():
    module = Conv1D(features=3)
    x = jax.random.normal(jax.random.key(2), (4, 5), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(3), x)
    is_out_in = lambda name: True  # noqa: E731
    (layer,) = fm.linen_linears(params, kernel_is_out_in=is_out_in)
    assert layer.name == "" and layer.weight.shape == (3, 5)
    grams = fm.linen_grams(module, params, [x], kernel_is_out_in=is_out_in)
    np.testing.assert_allclose(np.asarray(grams[""]), np.asarray(x.T @ x), rtol=1e-5, atol=1e-5)
