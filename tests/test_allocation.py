"""Sparsity allocation (fw_jax.pipeline.allocation, PruneSettings.allocation, --allocation): the
overall sparsity is exactly the requested one, OWL's block scores equal an independent
PyTorch computation, and the pipeline prunes every layer to its allocated budget."""

import json

import numpy as np
import pytest
import torch
import transformers

from fw_jax import models
from fw_jax.pipeline import Allocation, PruneInterrupted, PruneSettings, prune_model
from fw_jax.pipeline.allocation import apportion, block_sparsities
from test_pipeline_prune import calib_tokens, tiny_folder  # noqa: F401  (fixture)

SMOLLM2_KINDS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("sparsity, lam", [(0.5, 0.08), (0.7, 0.2), (0.6, 0.35), (0.3, 0.0)])
def test_apportion_keeps_each_kinds_total_exactly(sparsity, lam):
    rng = np.random.default_rng(int(sparsity * 100))
    per_block = block_sparsities(rng.random(30), sparsity, lam)
    np.testing.assert_allclose(per_block.mean(), sparsity, atol=1e-12)
    assert per_block.min() >= sparsity - lam - 1e-12 and per_block.max() <= sparsity + lam + 1e-12
    k = np.array(apportion(per_block, SMOLLM2_KINDS, sparsity))
    for i, (d_out, d_in) in enumerate(SMOLLM2_KINDS):
        uniform = round(d_in * (1 - sparsity))
        assert k[:, i].sum() == 30 * uniform  # so the model keeps exactly what uniform keeps
        assert np.all((k[:, i] >= 1) & (k[:, i] <= d_in))
        assert np.all(np.abs(k[:, i] - (1 - per_block) * d_in) < 1.5)  # each block near its own sparsity
    kept = sum(d_out * k[:, i].sum() for i, (d_out, _) in enumerate(SMOLLM2_KINDS))
    assert kept == sum(30 * d_out * round(d_in * (1 - sparsity)) for d_out, d_in in SMOLLM2_KINDS)


def test_block_sparsities_prune_the_highest_score_least():
    s = block_sparsities([0.01, 0.03, 0.02], 0.5, 0.1)
    np.testing.assert_allclose(s, [0.6, 0.4, 0.5])
    np.testing.assert_allclose(block_sparsities([0.02, 0.02], 0.5, 0.1), [0.5, 0.5])  # equal scores: uniform


def test_apportion_at_the_edges():
    """Budgets clipped to [1, d_in] still sum to the uniform total."""
    k = np.array(apportion([0.05, 0.95, 0.5], [(4, 8)], 0.5))
    assert k[:, 0].sum() == 3 * 4 and k.min() >= 1 and k.max() <= 8


def _torch_owl_scores(folder, tokens, outlier):
    """OWL's block scores from transformers+PyTorch: inputs of every linear layer captured with
    hooks on the dense model, Wanda scores |W|·‖x‖, the fraction above ``outlier`` × their mean."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    norms = {}

    def hook(name):
        def capture(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + (x ** 2).sum(0)
        return capture

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(torch.as_tensor(tokens, dtype=torch.long))
    scores = []
    for b in range(len(model.model.layers)):
        block = [(module.weight.double().abs() * norms[name].sqrt()[None]).flatten()
                 for name, module in linears.items() if name.split(".")[0] == str(b)]
        block = torch.cat(block)
        scores.append(float((block > outlier * block.mean()).double().mean()))
    return scores


def _prune(folder, allocation, **kwargs):
    loaded = models.load_model(folder)
    tokens = calib_tokens(n=6, length=32)
    report = prune_model(loaded, tokens, PruneSettings(method="wanda", sparsity=0.5, allocation=allocation),
                         progress=False, **kwargs)
    return loaded, report, tokens


def test_owl_scores_match_pytorch_and_budgets_hold(tiny_folder):  # noqa: F811
    allocation = Allocation("owl", lam=0.1, outlier=2.0)  # M = 2: the tiny random model has few outliers above 5
    loaded, report, tokens = _prune(tiny_folder, allocation)
    got = report.allocation
    want = _torch_owl_scores(tiny_folder, tokens, allocation.outlier)
    np.testing.assert_allclose(got["scores"], want, rtol=0, atol=2e-3)  # fractions; float32 vs float64
    assert len(set(np.round(got["block_sparsity"], 9))) > 1  # the blocks differ
    np.testing.assert_allclose(np.mean(got["block_sparsity"]), 0.5, atol=1e-12)
    kept = total_uniform = 0
    for r in report.layers:
        b = r["block"]
        i = [layer.name for layer in models.block_linears(loaded.model, b)].index(r["name"])
        w = np.asarray(models.block_linears(loaded.model, b)[i].weight)
        assert np.all((w != 0).sum(1) == got["budgets"][b][i]), r["name"]  # every row keeps its budget
        assert r["budget"] == f"PerRow(k={got['budgets'][b][i]})"
        kept += r["kept"]
        total_uniform += w.shape[0] * round(w.shape[1] * 0.5)
    assert kept == total_uniform  # exactly the requested overall sparsity
    assert report.to_json()["allocation"]["block_sparsity"] == got["block_sparsity"]


def test_error_allocation_resumes_bit_for_bit(tiny_folder, tmp_path):  # noqa: F811
    allocation = Allocation("error", lam=0.1)
    whole, report, _ = _prune(tiny_folder, allocation)
    assert len(set(np.round(report.allocation["block_sparsity"], 9))) > 1

    def stop_after_first(b):
        if b == 0:
            raise KeyboardInterrupt

    with pytest.raises(PruneInterrupted):
        _prune(tiny_folder, allocation, work_dir=str(tmp_path / "w"), after_block=stop_after_first)
    resumed, again, _ = _prune(tiny_folder, allocation, work_dir=str(tmp_path / "w"))
    assert again.resumed_blocks == 1 and again.allocation == report.allocation
    for b in range(models.num_blocks(whole.model)):
        for a, c in zip(models.block_linears(whole.model, b), models.block_linears(resumed.model, b)):
            np.testing.assert_array_equal(np.asarray(a.weight), np.asarray(c.weight))


def test_bad_allocations_are_refused():
    with pytest.raises(ValueError, match="allocation method must be one of owl, error"):
        Allocation("random")
    with pytest.raises(ValueError, match="lam"):
        Allocation(lam=-0.1)
    with pytest.raises(ValueError, match="n:m pattern"):
        PruneSettings(pattern=(2, 4), allocation=Allocation())
    with pytest.raises(ValueError, match="would leave"):
        PruneSettings(sparsity=0.95, allocation=Allocation(lam=0.08))
    with pytest.raises(ValueError, match="allocation must be"):
        PruneSettings(allocation="owl")


def test_cli_allocation(tiny_folder, tmp_path):  # noqa: F811
    from fw_jax import cli

    calib = tmp_path / "calib.txt"
    calib.write_text("Anne Elliot walked to the shore with her sister and the captain. " * 40)
    out = tmp_path / "out"
    assert cli.main(["prune", tiny_folder, "--out", str(out), "--method", "wanda", "--allocation", "owl",
                     "--owl-m", "2", "--allocation-lambda", "0.1", "--calib", str(calib), "--nsamples", "4",
                     "--seqlen", "24", "-q"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["allocation"] == {"method": "owl", "lam": 0.1, "outlier": 2.0}
    assert report["summary"]["kept_fraction"] == pytest.approx(0.5, abs=1e-12)
    assert {r["sparsity"] for r in report["layers"]} != {0.5}
    assert cli.main(["prune", tiny_folder, "--out", str(tmp_path / "o2"), "--allocation", "owl", "--pattern", "2:4",
                     "--calib", str(calib), "--nsamples", "4", "--seqlen", "24", "-q"]) == 2
