"""Mixtures of experts (Mixtral, Qwen3-MoE) against transformers + PyTorch, per-expert Gram
matrices against the PyTorch router, the fallback for experts few tokens reach, and `fw-jax
prune` / `eval` end to end (names, routers and budgets of the written folder, resume)."""

from __future__ import annotations

import json
import re
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from models_fixtures import VOCAB, folder_tensors, random_torch_model, token_ids, torch_logits

import fw_jax.models as fm
from fw_jax.cli import INTERRUPTED
from fw_jax.cli import main as cli_main

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> (transformers config, family, prefix of an expert in a sparse block, (gate, up, down) names)
CASES = {
    "mixtral": (lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=40, num_local_experts=4,
                                                   num_experts_per_tok=2, tie_word_embeddings=False),
                "mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    # One dense layer (mlp_only_layers), unnormalised top-k weights, biased attention.
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=40,
                                                      head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                      mlp_only_layers=[0], norm_topk_prob=False,
                                                      attention_bias=True, tie_word_embeddings=False),
                  "qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    # Dense layers from decoder_sparse_step (layers 0 and 2), normalised weights, a tied head.
    "qwen3_moe_step": (lambda: transformers.Qwen3MoeConfig(**{**_COMMON, "num_hidden_layers": 3},
                                                           intermediate_size=64, moe_intermediate_size=40,
                                                           head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                           decoder_sparse_step=2, norm_topk_prob=True,
                                                           tie_word_embeddings=True),
                       "qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
}


def sparse_layers(config) -> list[bool]:
    """Which layers have experts, by transformers' own modules."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    return [hasattr(layer.mlp, "experts") for layer in model.model.layers]


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    make, family, moe, names = CASES[request.param]
    config = make()
    torch_model = random_torch_model(config, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(folder)
    return dict(name=request.param, config=config, family=family, moe=moe, names=names, folder=folder,
                torch_model=torch_model)


def test_logits_and_perplexity_match_transformers(checkpoint):
    loaded = fm.load_model(checkpoint["folder"])
    assert loaded.family == checkpoint["family"]
    ids = token_ids(batch=3, length=20)
    ours = np.asarray(fm.logits(loaded.model, ids))
    ref = torch_logits(checkpoint["torch_model"], ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(loaded.model(ids)), ours, atol=1e-5, rtol=0)
    with torch.no_grad():  # the mean NLL over the same 3 windows of 20 tokens
        windows = torch.as_tensor(ids.reshape(3, 20), dtype=torch.long)
        loss = checkpoint["torch_model"](windows, labels=windows).loss.item()
    ppl = fm.perplexity(loaded.model, ids.reshape(-1), 20)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)


def test_experts_are_linear_layers_by_their_checkpoint_names_and_routers_are_not(checkpoint):
    loaded = fm.load_model(checkpoint["folder"])
    state = folder_tensors(checkpoint["folder"])
    names = fm.linear_names(loaded.model)
    sparse = sparse_layers(checkpoint["config"])
    last = max(i for i, s in enumerate(sparse) if s)
    # transformers wrote one tensor per expert, under the Hub's names.
    assert f"model.layers.{last}.{checkpoint['moe']}.experts.3.{checkpoint['names'][2]}.weight" in state
    expected = []
    for layer, has_experts in enumerate(sparse):
        at = f"model.layers.{layer}."
        expected += [at + f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if has_experts:
            gate, up, down = checkpoint["names"]
            for e in range(4):
                expected += [f"{at}{checkpoint['moe']}.experts.{e}.{p}" for p in (gate, up, down)]
        else:
            expected += [at + f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert names == expected
    assert not any(n.endswith(".gate") for n in names)  # the routers are not pruned
    for name in names:
        np.testing.assert_array_equal(np.asarray(fm.get_linear_weight(loaded.model, name)), state[name + ".weight"])
    # Every layer of a group reads the same input; an expert's key is its own.
    for layer in fm.block_linears(loaded.model, last):
        if ".experts." in layer.name:
            down = layer.name.endswith(checkpoint["names"][2])
            assert layer.input_key == layer.name.rsplit(".", 1)[0] + (".mid" if down else ".in")


def _torch_moe_inputs(torch_model, layer: int, ids) -> torch.Tensor:
    """The input of a layer's MoE block in PyTorch (after the post-attention norm), (N, d)."""
    seen = []
    hook = torch_model.model.layers[layer].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            torch_model(torch.as_tensor(ids, dtype=torch.long))
    finally:
        hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_expert_gram_is_over_the_tokens_the_torch_router_sends_it(checkpoint):
    sparse = sparse_layers(checkpoint["config"])
    layer = max(i for i, s in enumerate(sparse) if s)  # a sparse block after at least one other block
    ids = token_ids(batch=4, length=16, seed=3)
    torch_model = checkpoint["torch_model"]
    x = _torch_moe_inputs(torch_model, layer, ids)
    block = torch_model.model.layers[layer].mlp
    with torch.no_grad():
        _, _, chosen = block.gate(x)  # (N, k) expert indices, transformers' own router
        gate_up, f = block.experts.gate_up_proj, block.experts.intermediate_dim
        loaded = fm.load_model(checkpoint["folder"])
        hidden = fm.embed(loaded.model, ids)
        for b in range(layer):
            hidden = fm.run_block(loaded.model, b, hidden)
        grams, counts = fm.block_grams(loaded.model, layer, hidden, return_counts=True)
        at = f"model.layers.{layer}.{checkpoint['moe']}.experts"
        total = 0
        for e in range(4):
            routed = (chosen == e).any(-1)
            xe = x[routed]
            mid = torch.nn.functional.silu(xe @ gate_up[e, :f].T) * (xe @ gate_up[e, f:].T)
            for key, ref in ((f"{at}.{e}.in", xe.T @ xe), (f"{at}.{e}.mid", mid.T @ mid)):
                ref = ref.numpy()
                np.testing.assert_allclose(np.asarray(grams[key]), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
                assert counts[key] == int(routed.sum())
            total += int(routed.sum())
    assert total == 2 * x.shape[0]  # every token went to exactly k = 2 experts
    assert counts[f"model.layers.{layer}.attn_in"] == x.shape[0]  # a dense input counts every token
    # The two other return values are unchanged by the counts.
    plain = fm.block_grams(loaded.model, layer, hidden)
    with_inputs = fm.block_grams(loaded.model, layer, hidden, return_inputs=True, return_counts=True)
    assert len(with_inputs) == 3 and with_inputs[2] == counts
    for key in plain:
        np.testing.assert_array_equal(np.asarray(plain[key]), np.asarray(grams[key]))
    assert with_inputs[1][f"{at}.0.in"].shape == (x.shape[0], x.shape[1])
    # A dense block has no experts to fall back on, whatever the counts.
    for b in (i for i, s in enumerate(sparse) if not s):
        dense, dense_counts = fm.block_grams(loaded.model, b, fm.embed(loaded.model, ids), return_counts=True)
        zero = {key: 0 for key in dense_counts}
        assert fm.fallback_experts(loaded.model, b, zero) == {}
        assert fm.with_expert_fallback(loaded.model, b, dense, zero) == dense


def test_a_fused_experts_checkpoint_is_refused_saying_how_to_convert_it(tmp_path):
    config = CASES["qwen3_moe"][0]()
    random_torch_model(config).save_pretrained(tmp_path, save_original_format=False)
    with pytest.raises(fm.CheckpointError) as info:
        fm.load_model(tmp_path)
    message = str(info.value)
    assert "'model.layers.1.mlp.experts." in message and "holds every expert of a layer in one tensor" in message
    assert "save_original_format" in message and "save_pretrained(folder)" in message
    assert "model.safetensors" in message  # names the file


# --- An expert that no calibration token reaches. --------------------------------------------

DEAD = 3  # the expert of block 0 that no token is routed to


def dead_expert_model(seed: int = 2):
    """A tiny Mixtral whose block-0 expert ``DEAD`` no token can reach: coordinate 0 of every
    embedding is 1 and block 0's attention adds little (its output weights scaled by 1/100), so
    every MoE input has a positive coordinate 0, which the router gives ``-50`` times to that
    expert and 0 times to the others (routed by the tokens' own embeddings)."""
    config = CASES["mixtral"][0]()
    model = random_torch_model(config, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.layers[0].self_attn.o_proj.weight.mul_(1e-2)
        model.model.layers[0].post_attention_layernorm.weight[0] = 1.0
        router = model.model.layers[0].mlp.gate.weight
        router[:, 0] = 0.0
        router[DEAD, 0] = -50.0
    return config, model


@pytest.fixture(scope="module")
def dead_expert(tmp_path_factory):
    _, torch_model = dead_expert_model()
    folder = tmp_path_factory.mktemp("dead_expert")
    torch_model.save_pretrained(folder)
    return folder, torch_model


def test_an_expert_no_token_reaches_uses_the_fallback(dead_expert):
    folder, torch_model = dead_expert
    loaded = fm.load_model(folder)
    model = loaded.model
    ids = token_ids(batch=8, length=16, seed=5)
    np.testing.assert_allclose(np.asarray(fm.logits(model, ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    grams, counts = fm.block_grams(model, 0, fm.embed(model, ids), return_counts=True)
    at = "model.layers.0.block_sparse_moe.experts"
    assert counts[f"{at}.{DEAD}.in"] == 0 and not np.any(np.asarray(grams[f"{at}.{DEAD}.in"]))
    # The threshold is the hidden size (48) by default; 128 tokens x 2 experts over 3 live ones.
    live = {e: counts[f"{at}.{e}.in"] for e in range(4) if e != DEAD}
    assert all(n >= 48 for n in live.values()), live
    assert fm.fallback_experts(model, 0, counts) == {f"{at}.{DEAD}": 0}
    assert fm.fallback_experts(model, 0, counts, min_tokens=max(live.values()) + 1).keys() == {
        f"{at}.{e}" for e in range(4)}
    fixed = fm.with_expert_fallback(model, 0, grams, counts)
    assert set(fixed) == set(grams)
    for key in grams:  # only the dead expert's two matrices change
        if not key.startswith(f"{at}.{DEAD}."):
            assert fixed[key] is grams[key]
    # gate/up: the Gram matrix of every token entering the MoE layer (its input, mlp_in), x k/E = 2/4.
    x = np.asarray(fm.block_inputs(model, 0, fm.embed(model, ids))["model.layers.0.mlp_in"]).reshape(-1, 48)
    np.testing.assert_allclose(np.asarray(fixed[f"{at}.{DEAD}.in"]), x.T @ x * 2 / 4, rtol=1e-5,
                               atol=1e-5 * np.abs(x.T @ x).max())
    mid = np.asarray(fixed[f"{at}.{DEAD}.mid"])
    level = np.mean([np.mean(np.diag(np.asarray(grams[f"{at}.{e}.mid"]))) for e in range(4)])
    np.testing.assert_allclose(mid, level * np.eye(40), rtol=1e-6)
    # With enough tokens for every expert, nothing changes.
    assert fm.with_expert_fallback(model, 0, grams, {k: 10**6 for k in counts}) == grams
    # Pruned on the fallback, the dead expert's down projection keeps each row's largest weights.
    from fw_jax.pipeline import PruneSettings, prune_layer

    weight = fm.get_linear_weight(model, f"{at}.{DEAD}.w2")
    for method in ("wanda", "sparsefw", "sparsegpt"):
        pruned, _ = prune_layer(weight, fixed[f"{at}.{DEAD}.mid"], PruneSettings(method=method, sparsity=0.5))
        kept = np.asarray(pruned) != 0
        if method == "sparsegpt":  # its budget holds per layer
            assert kept.sum() == 48 * 20
        else:
            assert np.all(kept.sum(1) == 20), method
        if method == "wanda":
            largest = np.argsort(-np.abs(np.asarray(weight)), axis=1)[:, :20]
            assert np.all(np.take_along_axis(kept, largest, 1))


def test_fallback_masks_do_better_than_a_few_tokens_and_than_chance(tmp_path):
    """The measurement of ``_moe.py`` in small: Wanda masks of the experts' projections from the
    fallback matrices, against masks from 4 of the expert's own tokens and random masks, all
    scored on held-out tokens routed to the expert."""
    from fw_jax.pipeline import PruneSettings, prune_layer

    config = transformers.MixtralConfig(**{**_COMMON, "num_hidden_layers": 1}, intermediate_size=96,
                                        num_local_experts=4, num_experts_per_tok=2)
    random_torch_model(config, seed=4).save_pretrained(tmp_path)
    model = fm.load_model(tmp_path).model
    rng = np.random.default_rng(0)
    calib, test = (fm.embed(model, rng.integers(3, VOCAB, (16, 64)).astype(np.int32)) for _ in range(2))
    grams, counts = fm.block_grams(model, 0, calib, return_counts=True)
    fallback = fm.with_expert_fallback(model, 0, grams, {k: 0 for k in counts})
    inputs, held_out = fm.block_inputs(model, 0, calib), fm.block_inputs(model, 0, test)
    settings = PruneSettings(method="wanda", sparsity=0.5)
    errors = {"fallback": 0.0, "4 tokens": 0.0, "random": 0.0}
    def rows(x):  # the tokens routed to the expert
        x = np.asarray(x).reshape(-1, x.shape[-1])
        return x[np.any(x != 0, axis=1)]

    def error(w, new, xt):
        return float(np.sum((xt @ (w - np.asarray(new)).T) ** 2))

    for layer in fm.block_linears(model, 0):
        if ".experts." not in layer.name:
            continue
        x, xt, w = rows(inputs[layer.input_key]), rows(held_out[layer.input_key]), np.asarray(layer.weight)
        few = x[rng.permutation(len(x))[:4]]
        errors["fallback"] += error(w, prune_layer(w, fallback[layer.input_key], settings)[0], xt)
        errors["4 tokens"] += error(w, prune_layer(w, jnp.asarray(few.T @ few), settings)[0], xt)
        keep = np.argsort(rng.random(w.shape), axis=1) < w.shape[1] // 2
        errors["random"] += error(w, np.where(keep, w, 0), xt)
    assert errors["fallback"] < errors["4 tokens"] < errors["random"], errors


# --- fw-jax prune and eval end to end. --------------------------------------------------------

def _cli_folder(root, name, config, torch_model):
    from test_pipeline_data import char_tokenizer
    from test_pipeline_prune import TEXT

    folder = root / name
    torch_model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    calib = root / "calib.txt"
    if not calib.exists():
        calib.write_text(TEXT, encoding="utf-8")
    return folder, calib


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_cli")
    out = {}
    for name in ("mixtral", "qwen3_moe"):
        config = CASES[name][0]()
        out[name] = _cli_folder(root, name, config, random_torch_model(config, seed=7))
    config, dead = dead_expert_model()
    out["dead_expert"] = _cli_folder(root, "dead_expert", config, dead)
    return out


CLI_FAST = ["--nsamples", "4", "--seqlen", "16"]


def _budget_rows_ok(weight: np.ndarray, sparsity: float) -> bool:
    from fw_jax.pipeline import PruneSettings

    k = PruneSettings(sparsity=sparsity).budget(weight.shape[1]).k
    return bool(np.all((weight != 0).sum(1) == k))


@pytest.mark.parametrize("name, method", [("mixtral", "wanda"), ("qwen3_moe", "wanda"), ("dead_expert", "sparsefw")])
def test_prune_writes_every_expert_pruned_routers_untouched_in_the_checkpoint_names(cli_models, tmp_path, name,
                                                                                    method, capsys):
    folder, calib = cli_models[name]
    out = tmp_path / "pruned"
    extra = ["--max-iter", "5"] if method == "sparsefw" else []
    assert cli_main(["prune", str(folder), "--method", method, "--sparsity", "0.5", "--out", str(out),
                     "--calib", str(calib), *CLI_FAST, *extra]) == 0
    before, after = folder_tensors(folder), folder_tensors(out)
    assert set(after) == set(before)  # the checkpoint's own names, nothing added or lost
    pruned = [n for n in before if ".experts." in n or ".self_attn." in n and n.endswith("proj.weight")
              or ".mlp." in n and n.endswith("proj.weight") and ".gate." not in n]
    experts = [n for n in pruned if ".experts." in n]
    assert len(experts) == {"mixtral": 24, "qwen3_moe": 12, "dead_expert": 24}[name]
    for n in before:
        if n in pruned:
            assert _budget_rows_ok(after[n], 0.5), n
            assert np.all(before[n] != 0)  # so every zero is fw_jax's
        else:  # routers, norms, embeddings, head: bit for bit
            assert after[n].dtype == before[n].dtype and np.array_equal(after[n], before[n]), n
    routers = [n for n in before if n.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight"))]
    assert len(routers) == {"mixtral": 2, "qwen3_moe": 1, "dead_expert": 2}[name]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = token_ids(batch=2, length=12)
    ours = np.asarray(fm.logits(fm.load_model(out).model, ids))
    np.testing.assert_allclose(torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)
    report = json.loads((out / "prune_report.json").read_text())
    assert {layer["name"] for layer in report["layers"]} == {n.rsplit(".weight", 1)[0] for n in pruned}
    fell_back = {layer["name"] for layer in report["layers"] if "fallback" in layer}
    assert all("tokens" in layer for layer in report["layers"] if ".experts." in layer["name"])
    err = capsys.readouterr().err
    if name == "dead_expert":  # no token reaches expert 3 of block 0: its three layers, named on stderr
        dead = {f"model.layers.0.block_sparse_moe.experts.{DEAD}.{w}" for w in ("w1", "w2", "w3")}
        assert dead <= fell_back, fell_back
        assert all(layer["tokens"] == 0 for layer in report["layers"] if layer["name"] in dead)
        assert re.search(rf"block 0: \d+ expert layers had too few calibration tokens.*experts\.{DEAD}\.w1 \(0 tokens\)",
                         err), err
    else:
        assert not fell_back or all(".experts." in n for n in fell_back)
    assert cli_main(["eval", str(folder), str(out), "--data", str(calib), "--seqlen", "32",
                     "--max-windows", "2"]) == 0
    table = capsys.readouterr().out
    assert "pruned" in table and "ppl" in table


def test_streamed_prune_interrupted_after_the_first_block_resumes_to_the_same_folder(cli_models, tmp_path,
                                                                                      monkeypatch):
    from fw_jax.pipeline import prune

    folder, calib = cli_models["qwen3_moe"]

    def argv(out):
        return ["prune", str(folder), "--method", "wanda", "--out", str(tmp_path / out), "--calib", str(calib),
                *CLI_FAST]

    assert cli_main(argv("straight")) == 0
    real = prune._save_block

    def save_then_stop(work_dir, b, *args):
        real(work_dir, b, *args)
        if b == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(prune, "_save_block", save_then_stop)
        assert cli_main(argv("resumed")) == INTERRUPTED
    assert (tmp_path / "resumed.partial" / "block_0000.safetensors").exists()
    assert not (tmp_path / "resumed").exists()
    assert cli_main(argv("resumed")) == 0
    report = json.loads((tmp_path / "resumed" / "prune_report.json").read_text())
    assert report["resumed_blocks"] == 1
    a, b = folder_tensors(tmp_path / "straight"), folder_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("name, window", [("mixtral", dict(sliding_window=5)),
                                          ("qwen3_moe", dict(use_sliding_window=True, sliding_window=5))])
def test_sliding_window_is_applied(name, window, tmp_path):
    make, *_ = CASES[name]
    config = make()
    for key, value in window.items():
        setattr(config, key, value)
    torch_model = random_torch_model(config, seed=6)
    torch_model.save_pretrained(tmp_path)
    loaded = fm.load_model(tmp_path)
    assert loaded.model.spec.sliding_window == 5
    ids = token_ids(length=12)
    np.testing.assert_allclose(np.asarray(fm.logits(loaded.model, ids)), torch_logits(torch_model, ids),
                               atol=1e-4, rtol=0)
