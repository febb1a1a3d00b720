"""fw_jax.prune on Flax NNX models it has never seen: weights found by tracing, experts included.

The model here is written for the test: an embedding, two blocks of einsum attention with
``(D, N, H)`` kernels, an ``nnx.Linear`` MLP and a mixture of experts whose ``(E, D, F)`` stacked
weights are sliced per expert under top-1 routing (every expert applied to all tokens and masked
after), and a head. The weights' views, Gram matrices and routed tokens are computed here
independently (from the modules' own outputs, in numpy) and compared with what the tracer found.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fw_jax
from fw_jax.models._experts import OWN_FALLBACK, SHARED_FALLBACK
from fw_jax.models._traced import TracedBlocks

D, N, H, F, E, V, T = 16, 2, 8, 24, 4, 32, 6


class Attention(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(0.3)
        self.q = nnx.Param(init(rngs.params(), (D, N, H), jnp.float32))
        self.k = nnx.Param(init(rngs.params(), (D, N, H), jnp.float32))
        self.v = nnx.Param(init(rngs.params(), (D, N, H), jnp.float32))
        self.o = nnx.Param(init(rngs.params(), (N, H, D), jnp.float32))

    def __call__(self, x, mask):
        q = jnp.einsum("btd,dnh->btnh", x, self.q[...])
        k = jnp.einsum("btd,dnh->btnh", x, self.k[...])
        v = jnp.einsum("btd,dnh->btnh", x, self.v[...])
        scores = jnp.where(mask[:, None], jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), -1e9)
        return jnp.einsum("btnh,nhd->btd", jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v), self.o[...])


class Experts(nnx.Module):
    def __init__(self, rngs, never: int | None = None):
        init = nnx.initializers.normal(0.3)
        self.router = nnx.Linear(D, E, rngs=rngs, param_dtype=jnp.float32)
        if never is not None:  # an expert no token is routed to
            self.router.bias[...] = self.router.bias[...].at[never].set(-1e4)
        self.w_in = nnx.Param(init(rngs.params(), (E, D, F), jnp.float32))
        self.w_out = nnx.Param(init(rngs.params(), (E, F, D), jnp.float32))

    def choice(self, x):
        return jnp.argmax(self.router(x), -1)  # top-1

    def __call__(self, x):
        choice = self.choice(x)
        out = jnp.zeros_like(x)
        for e in range(E):  # every expert on every token, masked after
            hidden = jax.nn.gelu(x @ self.w_in[e])
            out = out + jnp.where((choice == e)[..., None], hidden @ self.w_out[e], 0.0)
        return out


class Block(nnx.Module):
    def __init__(self, rngs, never=None):
        self.norm1 = nnx.RMSNorm(D, rngs=rngs, param_dtype=jnp.float32)
        self.attn = Attention(rngs)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs, param_dtype=jnp.float32)
        self.up = nnx.Linear(D, F, rngs=rngs, param_dtype=jnp.float32)
        self.down = nnx.Linear(F, D, rngs=rngs, param_dtype=jnp.float32)
        self.norm3 = nnx.RMSNorm(D, rngs=rngs, param_dtype=jnp.float32)
        self.moe = Experts(rngs, never)

    def mlp_input(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x, self.norm2(x)

    def __call__(self, x, mask):
        x, h = self.mlp_input(x, mask)
        x = x + self.down(jax.nn.relu(self.up(h)))
        return x + self.moe(self.norm3(x))


class Tiny(nnx.Module):
    def __init__(self, seed=0, never=None):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(V, D, rngs=rngs, param_dtype=jnp.float32)
        self.layers = nnx.List([Block(rngs, never) for _ in range(2)])
        self.head = nnx.Linear(D, V, rngs=rngs, param_dtype=jnp.float32)

    def __call__(self, tokens):
        mask = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))[None]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


def _batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.integers(0, V, (2, T))) for _ in range(n)]


def _params(model) -> dict:
    return {".".join(map(str, p)): np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _views(params: dict, b: int) -> dict:
    """Every contracted weight of block ``b`` as ``(d_out, d_in)``, written out by hand."""
    p = lambda name: params[f"layers.{b}.{name}"]  # noqa: E731
    views = {f"layers.{b}.attn.{w}": p(f"attn.{w}").reshape(D, N * H).T for w in "qkv"}
    views[f"layers.{b}.attn.o"] = p("attn.o").reshape(N * H, D).T
    views[f"layers.{b}.up.kernel"] = p("up.kernel").T
    views[f"layers.{b}.down.kernel"] = p("down.kernel").T
    for e in range(E):
        views[f"layers.{b}.moe.w_in[{e}]"] = p("moe.w_in")[e].T
        views[f"layers.{b}.moe.w_out[{e}]"] = p("moe.w_out")[e].T
    return views


def _contracted(name: str) -> bool:
    return any(part in name for part in (".attn.", "up.kernel", "down.kernel", "moe.w_in", "moe.w_out"))


@pytest.mark.parametrize("method", ["wanda", "sparsefw"])
def test_every_contracted_weight_at_its_budget_and_nothing_else_changed(method):
    model = Tiny()
    before = _params(model)
    options = {"options": fw_jax.SolverOptions(max_iter=20)} if method == "sparsefw" else {}
    report = fw_jax.prune(model, _batches(), sparsity=0.5, method=method, progress=False, **options)
    after = _params(model)
    expected = {**_views(before, 0), **_views(before, 1)}
    assert [r["name"] for r in report.layers] == list(expected)  # forward order, routers left out
    pruned = {**_views(after, 0), **_views(after, 1)}
    for name, dense in expected.items():
        new = pruned[name]
        budget = round(dense.shape[1] * 0.5)
        assert np.all(np.count_nonzero(new, axis=1) == budget), name  # exactly its budget in every row
        np.testing.assert_array_equal(new, np.where(new != 0, dense, 0), err_msg=name)  # kept weights kept
    for name, value in before.items():
        if not _contracted(name):  # embedding, norms, routers, biases, head: bit-identical
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert set(report.left_dense) == {"layers.0.moe.router.kernel", "layers.1.moe.router.kernel"}
    assert json.loads(json.dumps(report.to_json()))["left_dense"] == report.left_dense
    tokens = {r["name"]: r["tokens"] for r in report.layers if "moe.w_" in r["name"]}
    for b in range(2):  # every token goes to one expert
        assert sum(tokens[f"layers.{b}.moe.w_in[{e}]"] for e in range(E)) == 3 * 2 * T


def test_grams_equal_an_independent_computation_of_the_activations():
    model = Tiny()
    batches = _batches(6)
    blocks = TracedBlocks(model)
    hidden = blocks.first_inputs(batches)
    for b in range(2):
        layers = {layer.name: layer for layer in blocks.linears(b)}
        grams = blocks.grams(b, hidden)
        block = model.layers[b]
        up_x, w_in_x, w_out_x = [], {e: [] for e in range(E)}, {e: [] for e in range(E)}
        for call in hidden:
            x, mask = call.args
            x, h = block.mlp_input(x, mask)
            up_x.append(np.asarray(h, np.float64).reshape(-1, D))
            x = x + block.down(jax.nn.relu(block.up(h)))
            moe_x = block.norm3(x)
            choice = np.asarray(block.moe.choice(moe_x)).reshape(-1)
            rows = np.asarray(moe_x, np.float64).reshape(-1, D)
            for e in range(E):
                w_in_x[e].append(rows[choice == e])
                hid = jax.nn.gelu(jnp.asarray(rows[choice == e], jnp.float32) @ block.moe.w_in[e])
                w_out_x[e].append(np.asarray(hid, np.float64))
        gram = lambda parts: (lambda x: x.T @ x)(np.concatenate(parts))  # noqa: E731
        np.testing.assert_allclose(grams[layers[f"layers.{b}.up.kernel"].input_key], gram(up_x), rtol=1e-5, atol=1e-5)
        assert layers[f"layers.{b}.up.kernel"].input_key != layers[f"layers.{b}.attn.q"].input_key
        assert layers[f"layers.{b}.attn.q"].input_key == layers[f"layers.{b}.attn.v"].input_key  # one input
        # The routed tokens only, though every expert sees every token; an expert that fewer
        # tokens than D reached gets the fallback: the mean of the experts' input matrices, and
        # the mean diagonal entry of their hidden ones times the identity.
        own_in, own_out = ([gram(parts[e]) for e in range(E)] for parts in (w_in_x, w_out_x))
        level = np.mean([np.mean(np.diag(g)) for g in own_out])
        counts = [len(np.concatenate(w_in_x[e])) for e in range(E)]
        assert min(counts) < D <= max(counts), counts  # both cases are checked
        for e in range(E):
            few = counts[e] < D
            want_in, want_out = (np.mean(own_in, axis=0), level * np.eye(F)) if few else (own_in[e], own_out[e])
            np.testing.assert_allclose(grams[layers[f"layers.{b}.moe.w_in[{e}]"].input_key], want_in,
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(grams[layers[f"layers.{b}.moe.w_out[{e}]"].input_key], want_out,
                                       rtol=1e-5, atol=1e-5)
            assert blocks.expert_tokens[f"layers.{b}.moe.w_in[{e}]"] == counts[e]
            assert blocks.fallbacks.get(f"layers.{b}.moe.w_in[{e}]") == (SHARED_FALLBACK if few else None)
            assert blocks.fallbacks.get(f"layers.{b}.moe.w_out[{e}]") == (OWN_FALLBACK if few else None)
        hidden = blocks.run(b, hidden)
        for call, batch in zip(hidden, batches):  # what the next block receives
            x = model.embed(batch)
            for layer in model.layers[:b + 1]:
                x = layer(x, call.args[1])
            np.testing.assert_allclose(call.args[0], x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_weight_views_round_trip_bit_for_bit(dtype):
    model = Tiny()
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), state))
    before = _params(model)
    blocks = TracedBlocks(model)
    blocks.first_inputs(_batches(1))
    for b in range(2):
        layers = blocks.linears(b)
        views = _views(before, b)
        for layer in layers:  # the tracer's view is the hand-written one
            np.testing.assert_array_equal(np.asarray(layer.weight), views[layer.name].astype(np.float32))
        blocks.set_weights(b, {layer.name: layer.weight for layer in layers})
    after = _params(model)
    for name, value in before.items():
        assert after[name].dtype == value.dtype
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    blocks.set_weights(0, {"layers.0.moe.w_in[2]": jnp.zeros((F, D))})  # one expert: its slice only
    changed = _params(model)["layers.0.moe.w_in"]
    assert np.all(changed[2] == 0)
    np.testing.assert_array_equal(np.delete(changed, 2, axis=0), np.delete(before["layers.0.moe.w_in"], 2, axis=0))


def test_sequential_calibrates_on_the_pruned_blocks_and_not_sequential_on_the_dense_ones():
    batches = _batches()
    dense_model = Tiny()
    dense_out = [dense_model.layers[0](dense_model.embed(x), jnp.tril(jnp.ones((T, T), bool))[None]) for x in batches]
    outputs = {}
    for sequential in (True, False):
        model = Tiny()
        blocks = TracedBlocks(model, sequential=sequential)
        hidden = blocks.first_inputs(batches)
        layers = blocks.linears(0)
        blocks.grams(0, hidden)
        blocks.set_weights(0, {layer.name: layer.weight.at[:, ::2].set(0) for layer in layers})
        outputs[sequential] = [call.args[0] for call in blocks.run(0, hidden)]
        assert np.all(_views(_params(model), 0)["layers.0.up.kernel"][:, ::2] == 0)  # still pruned after run
    for dense, not_sequential, sequential in zip(dense_out, outputs[False], outputs[True]):
        np.testing.assert_array_equal(not_sequential, dense)
        assert not np.allclose(sequential, dense, atol=1e-3)
    reports = {s: fw_jax.prune(Tiny(), batches, method="wanda", sequential=s, progress=False) for s in (True, False)}
    first = {s: [r["error"] for r in reports[s].layers if r["block"] == 0] for s in reports}
    second = {s: [r["error"] for r in reports[s].layers if r["block"] == 1] for s in reports}
    assert first[True] == first[False]  # block 0 sees the same inputs either way
    assert second[True] != second[False]


def test_an_expert_with_no_tokens_is_pruned_on_the_fallback_and_reported():
    model = Tiny(never=3)
    before = _params(model)
    report = fw_jax.prune(model, _batches(8), method="wanda", progress=False)
    records = {r["name"]: r for r in report.layers}
    for b in range(2):
        w_in, w_out = f"layers.{b}.moe.w_in[3]", f"layers.{b}.moe.w_out[3]"
        assert records[w_in]["tokens"] == records[w_out]["tokens"] == 0
        assert records[w_in]["fallback"] == SHARED_FALLBACK and records[w_out]["fallback"] == OWN_FALLBACK
        # Its down projection keeps each row's largest weights (an identity Gram matrix).
        dense, new = _views(before, b)[w_out], _views(_params(model), b)[w_out]
        keep = round(dense.shape[1] * 0.5)
        magnitude = np.zeros(dense.shape, bool)
        np.put_along_axis(magnitude, np.argsort(-np.abs(dense), axis=1)[:, :keep], True, axis=1)
        np.testing.assert_array_equal(new != 0, magnitude, err_msg=w_out)
        for e in range(3):  # the live experts, 48 tokens each on average, have their own
            if records[f"layers.{b}.moe.w_in[{e}]"]["tokens"] >= D:
                assert "fallback" not in records[f"layers.{b}.moe.w_in[{e}]"]
    assert any(records[f"layers.{b}.moe.w_in[{e}]"]["tokens"] >= D for b in range(2) for e in range(3))


def test_targets_and_exclude_choose_the_weights():
    report = fw_jax.prune(Tiny(), _batches(1), method="wanda", exclude=r"\.attn\.", progress=False)
    assert report.layers and not any(".attn." in r["name"] for r in report.layers)
    report = fw_jax.prune(Tiny(), _batches(1), method="wanda", targets=r"router|layers\.1\.attn\.q$", progress=False)
    assert [r["name"] for r in report.layers] == ["layers.0.moe.router.kernel", "layers.1.attn.q",
                                                  "layers.1.moe.router.kernel"]


class _Flat(nnx.Module):
    def __init__(self):
        self.embed = nnx.Embed(V, D, rngs=nnx.Rngs(0))
        self.proj = nnx.Linear(D, D, rngs=nnx.Rngs(1))

    def __call__(self, tokens):
        return self.proj(self.embed(tokens))


class _Twice(nnx.Module):
    def __init__(self, rngs):
        self.shared = nnx.Linear(D, D, rngs=rngs)
        self.other = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.other(x) + self.shared(x) + self.shared(jax.nn.relu(x))  # one weight, two inputs


class _TwiceModel(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([_Twice(rngs), _Twice(rngs)])

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return x


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"_Flat has no list of modules .* pass blocks="):
        fw_jax.prune(_Flat(), _batches(1), progress=False)
    with pytest.raises(ValueError, match=r"blocks='layerz'"):
        fw_jax.prune(Tiny(), _batches(1), blocks="layerz", progress=False)

    def failing(model, batch):
        return model(batch["tokens"])  # the batches are arrays, not dicts

    with pytest.raises(RuntimeError, match=r"forward\(model, batch\) raised TypeError on calibration batch 0.*string indexing"):
        fw_jax.prune(Tiny(), _batches(1), forward=failing, progress=False)
    with pytest.raises(ValueError, match=r"without calling block 0 .* jax\.jit"):
        fw_jax.prune(Tiny(), _batches(1), forward=lambda m, batch: nnx.jit(lambda m, x: m(x))(m, batch),
                     progress=False)
    with pytest.raises(ValueError, match=r"parameter layers\.0\.shared\.kernel is contracted with 2 different "
                                         r"inputs in block 0.*exclude="):
        fw_jax.prune(_TwiceModel(), _batches(1), method="wanda", progress=False)
    report = fw_jax.prune(_TwiceModel(), _batches(1), method="wanda", exclude=r"\.shared\.", progress=False)
    assert [r["name"] for r in report.layers] == ["layers.0.other.kernel", "layers.1.other.kernel"]
    with pytest.raises(TypeError, match="linen"):
        fw_jax.prune((object(), {}), _batches(1), progress=False)


def test_the_engine_prunes_block_0_with_wanda_s_masks_of_its_gram_matrices():
    """The engine's first block, through the front-end, against Wanda's masks computed here from
    the same block's Gram matrices (block 0 sees the dense model's inputs either way)."""
    from fw_jax.solver import PerRow, saliency_mask, saliency_scores

    engine, fresh = Tiny(), Tiny()
    fw_jax.prune(engine, _batches(), method="wanda", progress=False)
    blocks = TracedBlocks(fresh)
    hidden = blocks.first_inputs(_batches())
    grams = blocks.grams(0, hidden)
    after = {l.name: np.asarray(l.weight) for l in _traced_views(engine, 0)}
    for layer in blocks.linears(0):
        k = round(layer.weight.shape[1] * 0.5)
        mask = np.asarray(saliency_mask(saliency_scores("wanda", layer.weight, grams[layer.input_key]), PerRow(k)))
        np.testing.assert_array_equal(after[layer.name] != 0, mask, err_msg=layer.name)
        np.testing.assert_array_equal(after[layer.name][mask], np.asarray(layer.weight)[mask], err_msg=layer.name)


def _traced_views(model, b):
    """Block ``b``'s weights of ``model`` as (d_out, d_in) views, read through a new front-end
    (which needs the block's inputs to trace it)."""
    blocks = TracedBlocks(model)
    blocks.first_inputs(_batches())
    return blocks.linears(b)


# --- Tunix's models (google-tunix, an optional extra: pip install -e ".[test,tunix]") ---------

tunix = pytest.mark.skipif(importlib.util.find_spec("tunix") is None, reason="google-tunix is not installed")


def _tunix_forward(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))[None].repeat(tokens.shape[0], 0)
    return model(tokens, positions, None, mask)


def _check_tunix(model, expected_names):
    state = nnx.state(model, nnx.Param)  # Tunix initialises some kernels to zeros: random weights instead
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))
    before = _params(model)
    report = fw_jax.prune(model, _batches(2), forward=_tunix_forward, method="wanda", progress=False)
    after = _params(model)
    names = [r["name"] for r in report.layers]
    assert all(any(pattern in n for n in names) for pattern in expected_names), names
    for r in report.layers:
        d_out, d_in = r["shape"]
        assert r["kept"] == d_out * round(d_in * 0.5), r["name"]
    pruned_params = {n.split("[")[0] for n in names}
    for name, value in before.items():
        if name not in pruned_params:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
        else:
            assert np.count_nonzero(after[name]) < np.count_nonzero(value), name
    return report


@tunix
def test_tunix_llama3_and_qwen3_are_pruned():
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen3 import model as qwen3

    small = dict(num_layers=2, vocab_size=V, embed_dim=D, hidden_dim=F, num_heads=2, head_dim=8, num_kv_heads=1,
                 rope_theta=10000, norm_eps=1e-6)
    llama = llama3.Llama3(llama3.ModelConfig(**small), rngs=nnx.Rngs(0))
    _check_tunix(llama, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                         "mlp.up_proj", "mlp.down_proj"])
    qwen = qwen3.Qwen3(qwen3.ModelConfig(**small), rngs=nnx.Rngs(0))
    _check_tunix(qwen, ["attn.q_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])


@tunix
def test_tunix_qwen3_moe_prunes_each_expert_on_its_tokens():
    from tunix.models.qwen3 import model as qwen3

    config = qwen3.ModelConfig(num_layers=2, vocab_size=V, embed_dim=D, hidden_dim=F, num_heads=2, head_dim=8,
                               num_kv_heads=1, rope_theta=10000, norm_eps=1e-6, num_experts=E, num_experts_per_tok=2)
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    report = _check_tunix(model, [f"mlp.gate_proj[{e}]" for e in range(E)] + ["mlp.down_proj[0]"])
    assert not any("router" in r["name"] for r in report.layers)
    tokens = [r["tokens"] for r in report.layers if ".mlp.up_proj[" in r["name"] and r["block"] == 0]
    assert sum(tokens) == 2 * 2 * 2 * T  # 2 experts per token


# --- transformers as pip leaves it beside Tunix -------------------------------------------------


def test_a_broken_transformers_install_is_not_reported_as_a_bad_config(tmp_path, monkeypatch):
    """pip installing google-tunix after fw_jax downgrades transformers and can leave a package it
    imports (``kernels``) at a version it does not support: importing a config class then raises a
    ValueError, which must not read as a problem of the user's config.json."""
    import json

    import transformers

    from fw_jax.models import CheckpointError, UnsupportedModelError
    from fw_jax.models._hf import read_hf_config

    config = {"model_type": "llama", "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 1,
              "intermediate_size": 64, "vocab_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_hf_config(tmp_path).hidden_size == 48
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match=r"config.json: invalid llama config: .*attention heads \(5\)"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "no-such-model"}))
    with pytest.raises(UnsupportedModelError, match=r"config.json: unknown architecture model_type='no-such-model'"):
        read_hf_config(tmp_path)

    class Broken(dict):  # what importing a config module does when a package it imports is broken
        def __getitem__(self, model_type):
            raise ValueError("Either a revision or a version must be specified.")

    monkeypatch.setattr(transformers, "CONFIG_MAPPING", Broken(llama=None))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportError, match=r"transformers .* cannot import its llama configuration .*ValueError: "
                                          r"Either a revision .* not of the model") as raised:
        read_hf_config(tmp_path)
    assert not isinstance(raised.value, CheckpointError)
    # On the command line: the message, exit 1 (the environment, not a usage error), no traceback.
    import contextlib
    import io

    from fw_jax.cli import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["prune", str(tmp_path), "--out", str(tmp_path / "out"), "--calib", "pydoc-calib"])
    assert code == 1 and "cannot import its llama configuration" in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue() and not (tmp_path / "out").exists()


# --- A linen (module, params) pair -------------------------------------------------------------

from flax import linen as nn  # noqa: E402


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(F, name="up")(nn.LayerNorm(name="norm")(x)))
        w = self.param("proj", nn.initializers.normal(0.3), (F, N, H))  # an einsum kernel
        return x + jnp.einsum("btf,fnh->btnh", h, w).reshape(x.shape)


class LinenTiny(nn.Module):
    def setup(self):
        self.embed = nn.Embed(V, D)
        self.layers = [LinenBlock() for _ in range(3)]
        self.head = nn.Dense(V)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _wanda_kept(weight, x, keep):
    """The Wanda mask of ``weight`` (d_out, d_in) on inputs ``x`` (n, d_in), by hand."""
    scores = np.abs(weight) * np.linalg.norm(x, axis=0)[None]
    kept = np.zeros(weight.shape, bool)
    np.put_along_axis(kept, np.argsort(-scores, axis=1)[:, :keep], True, axis=1)
    return kept


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_linen_pair_is_pruned_into_new_params_sequentially(wrapped):
    assert D == N * H  # the einsum kernel's output is the hidden state
    module = LinenTiny()
    variables = module.init(jax.random.key(1), jnp.zeros((2, T), jnp.int32))
    given = variables if wrapped else variables["params"]
    before = jax.tree.map(np.array, given)
    batches = _batches(4)
    new, report = fw_jax.prune((module, given), batches, method="wanda", progress=False)
    assert [r["name"] for r in report.layers] == [f"layers.{b}.{w}" for b in range(3) for w in ("up.kernel", "proj")]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, given), before)  # the input is unchanged
    assert ("params" in new) == wrapped
    new_p, old_p = (new["params"], before["params"]) if wrapped else (new, before)
    for name in ("embed", "head"):
        jax.tree.map(np.testing.assert_array_equal, new_p[name], old_p[name])
    # Independently: each block's Wanda masks from the activations of the blocks pruned before it.
    x = jnp.concatenate([module.apply({"params": new_p}, t, method=lambda m, t: m.embed(t)) for t in batches])
    for b in range(3):
        old, cur = old_p[f"layers_{b}"], new_p[f"layers_{b}"]
        jax.tree.map(np.testing.assert_array_equal, cur["norm"], old["norm"])
        np.testing.assert_array_equal(cur["up"]["bias"], old["up"]["bias"])
        normed = nn.LayerNorm().apply({"params": cur["norm"]}, x)
        up_in = np.asarray(normed, np.float64).reshape(-1, D)
        hidden = nn.gelu(normed @ old["up"]["kernel"] + old["up"]["bias"])  # a block's layers: its dense inputs
        proj_in = np.asarray(hidden, np.float64).reshape(-1, F)
        for weight, now, inputs in ((old["up"]["kernel"].T, cur["up"]["kernel"].T, up_in),
                                    (old["proj"].reshape(F, D).T, cur["proj"].reshape(F, D).T, proj_in)):
            kept = _wanda_kept(weight, inputs, weight.shape[1] // 2)
            np.testing.assert_array_equal(np.asarray(now) != 0, kept, err_msg=f"block {b}, {weight.shape}")
            np.testing.assert_array_equal(now, np.where(kept, weight, 0))
        x = LinenBlock().apply({"params": cur}, x)


def test_a_linen_model_without_indexed_blocks_says_to_name_them():
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Dense(V)(nn.Embed(V, D)(tokens))

    module = Flat()
    params = module.init(jax.random.key(0), jnp.zeros((2, T), jnp.int32))
    with pytest.raises(ValueError, match="blocks='prefix'"):
        fw_jax.prune((module, params), _batches(1), method="wanda", progress=False)
    module = LinenTiny()
    params = module.init(jax.random.key(0), jnp.zeros((2, T), jnp.int32))
    with pytest.raises(ValueError, match=r"blocks='decoder'.*layers"):
        fw_jax.prune((module, params), _batches(1), blocks="decoder", method="wanda", progress=False)
    new, report = fw_jax.prune((module, params), _batches(1), blocks="layers", method="wanda", progress=False)
    assert len(report.layers) == 6

    class Compact(nn.Module):  # unnamed blocks are LinenBlock_0, LinenBlock_1, ...; their Dense are not blocks
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(V, D)(tokens)
            for _ in range(2):
                x = LinenBlock()(x)
            return nn.Dense(V)(x)

    module = Compact()
    params = module.init(jax.random.key(0), jnp.zeros((2, T), jnp.int32))
    new, report = fw_jax.prune((module, params), _batches(1), method="wanda", progress=False)
    assert [r["name"] for r in report.layers][:2] == ["LinenBlock.0.up.kernel", "LinenBlock.0.proj"]
    assert np.mean(np.asarray(new["params"]["LinenBlock_1"]["up"]["kernel"]) == 0) == 0.5
