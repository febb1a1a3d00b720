"""Block-wise recovery (fw_jax.pipeline.recover, PruneSettings.recover, --recover): masks kept bit
for bit, the loss against the dense block never worse, deterministic, resumable, and a non-finite
loss keeps the pruned weights."""

import numpy as np
import pytest

from fw_jax import models
from fw_jax.pipeline import PruneInterrupted, PruneSettings, RecoverSettings, prune_model
from test_pipeline_prune import calib_tokens, tiny_folder  # noqa: F401  (fixture)


def _weights(loaded):
    return {layer.name: np.asarray(layer.weight) for b in range(models.num_blocks(loaded.model))
            for layer in models.block_linears(loaded.model, b)}


def _prune(folder, recover, **kwargs):
    loaded = models.load_model(folder)
    report = prune_model(loaded, calib_tokens(n=8), PruneSettings(method="wanda", recover=recover), progress=False,
                         **kwargs)
    return loaded, report


def test_recovery_keeps_the_masks_lowers_the_loss_and_is_deterministic(tiny_folder):  # noqa: F811
    settings = RecoverSettings(steps=30, learning_rate=3e-3, batch_size=2, eval_every=5, patience=10)
    plain, _ = _prune(tiny_folder, None)
    tuned, report = _prune(tiny_folder, settings)
    again, _ = _prune(tiny_folder, settings)
    plain_w, tuned_w = _weights(plain), _weights(tuned)
    for name in plain_w:
        if ".0." in name:  # block 0 sees the same inputs in both runs: the same masks, bit for bit
            np.testing.assert_array_equal(tuned_w[name] != 0, plain_w[name] != 0)
        d_in = tuned_w[name].shape[1]  # later blocks' masks follow their (recovered) inputs; budgets hold
        assert np.all(np.sum(tuned_w[name] != 0, axis=1) == d_in // 2), name
        np.testing.assert_array_equal(tuned_w[name], _weights(again)[name])  # deterministic
    recoveries = {r["block"]: r["block_recovery"] for r in report.layers}
    assert len(recoveries) == models.num_blocks(tuned.model)
    for r in recoveries.values():
        assert r["loss_after"] <= r["loss_before"] and r["stopped"] in ("steps", "early", "worse")
    assert any(r["loss_after"] < 0.9 * r["loss_before"] for r in recoveries.values())
    assert any(not np.array_equal(tuned_w[n], plain_w[n]) for n in plain_w)


def test_recover_block_never_brings_back_a_pruned_weight(tiny_folder):  # noqa: F811
    """recover_block on one pruned block: every zero stays exactly zero, the kept weights move."""
    import jax.numpy as jnp

    from fw_jax.pipeline.recover import recover_block

    loaded = models.load_model(tiny_folder)
    hidden = models.embed(loaded.model, jnp.asarray(calib_tokens(n=6)))
    target = models.run_block(loaded.model, 0, hidden)
    rng = np.random.default_rng(0)
    pruned = {}
    for layer in models.block_linears(loaded.model, 0):
        w = np.asarray(layer.weight) * (rng.random(layer.weight.shape) < 0.4)
        pruned[layer.name] = w
    models.set_linear_weights(loaded.model, pruned)
    record = recover_block(loaded.model, 0, hidden, target, RecoverSettings(steps=20, learning_rate=3e-3,
                                                                             batch_size=2, eval_every=5))
    assert record["loss_after"] < record["loss_before"] and record["stopped"] in ("steps", "early")
    for layer in models.block_linears(loaded.model, 0):
        after = np.asarray(layer.weight)
        np.testing.assert_array_equal(after[pruned[layer.name] == 0], 0.0)
        assert not np.array_equal(after, pruned[layer.name])


@pytest.mark.parametrize("loss", ["block", "token"])
def test_the_recovery_loss_is_the_documented_one(tiny_folder, loss):  # noqa: F811
    """loss_before of a record is, on the untouched pruned block, the documented relative error,
    computed here in float64 numpy from the block's outputs (the first position's target scaled a
    hundredfold, so that it holds most of the energy, as an attention sink does); recovery under
    either loss keeps the zeros."""
    import jax.numpy as jnp

    from fw_jax.pipeline.recover import recover_block

    loaded = models.load_model(tiny_folder)
    hidden = models.embed(loaded.model, jnp.asarray(calib_tokens(n=6)))
    target = np.asarray(models.run_block(loaded.model, 0, hidden), np.float64)
    target[:, 0] *= 100.0  # an "attention sink": the first position dominates the energy
    rng = np.random.default_rng(1)
    pruned = {layer.name: np.asarray(layer.weight) * (rng.random(layer.weight.shape) < 0.9)
              for layer in models.block_linears(loaded.model, 0)}
    models.set_linear_weights(loaded.model, pruned)
    out = np.asarray(models.run_block(loaded.model, 0, hidden), np.float64)
    err, energy = ((out - target) ** 2).sum(-1), (target**2).sum(-1)
    block, token = err.sum() / energy.sum(), np.mean(err / energy)
    assert abs(block - token) > 0.1 * token  # the two losses differ here, so the check below tells them apart
    expected = block if loss == "block" else token
    record = recover_block(loaded.model, 0, hidden, jnp.asarray(target, jnp.float32),
                           RecoverSettings(steps=10, learning_rate=3e-3, batch_size=2, eval_every=5, loss=loss))
    np.testing.assert_allclose(record["loss_before"], expected, rtol=1e-4)
    assert record["loss_after"] <= record["loss_before"]
    for layer in models.block_linears(loaded.model, 0):
        np.testing.assert_array_equal(np.asarray(layer.weight)[pruned[layer.name] == 0], 0.0)


def test_the_proximal_term_holds_the_weights_near_their_start(tiny_folder):  # noqa: F811
    """With proximal=λ the kept weights move less from their pre-recovery values the larger λ
    (λ = 0 is plain recovery; a wrong sign or a term not applied would move them as far or
    further), the zeros stay zeros and the block loss is still no worse."""
    import jax.numpy as jnp

    from fw_jax.pipeline.recover import recover_block

    loaded = models.load_model(tiny_folder)
    hidden = models.embed(loaded.model, jnp.asarray(calib_tokens(n=6)))
    target = models.run_block(loaded.model, 0, hidden)
    rng = np.random.default_rng(0)
    pruned = {layer.name: np.asarray(layer.weight) * (rng.random(layer.weight.shape) < 0.5)
              for layer in models.block_linears(loaded.model, 0)}
    size = sum(float(np.sum(w.astype(np.float64) ** 2)) for w in pruned.values())
    moved = []
    for lam in (0.0, 5.0, 100.0):
        models.set_linear_weights(loaded.model, pruned)
        record = recover_block(loaded.model, 0, hidden, target, RecoverSettings(
            steps=20, learning_rate=3e-3, batch_size=2, eval_every=20, patience=1, proximal=lam))
        assert record["stopped"] == "steps" and record["loss_after"] < record["loss_before"]
        after = {layer.name: np.asarray(layer.weight, np.float64) for layer in models.block_linears(loaded.model, 0)}
        for name, w in after.items():
            np.testing.assert_array_equal(w[pruned[name] == 0], 0.0)
        moved.append(sum(float(np.sum((after[n] - pruned[n]) ** 2)) for n in after) / size)
    assert moved[0] > moved[1] > moved[2] > 0, moved
    assert moved[2] < 0.5 * moved[0], moved


def test_recover_settings_record_every_field():
    """Every field is in the record, at its default too (a new one changes the run's identity:
    tests/test_identity.py); set, it is recorded and named in the description."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(RecoverSettings)}
    assert set(PruneSettings(recover=RecoverSettings()).record()["recover"]) == fields
    assert PruneSettings(recover=RecoverSettings()).record()["recover"]["dense_pull"] == 0.0
    assert PruneSettings(recover=RecoverSettings(proximal=0.5)).record()["recover"]["proximal"] == 0.5
    assert PruneSettings(recover=RecoverSettings(dense_pull=2.0)).record()["recover"]["dense_pull"] == 2.0
    assert RecoverSettings(dense_pull=0.3).describe() == " (dense pull 0.3)"
    assert PruneSettings(recover=RecoverSettings()).describe().endswith("+ recovery")
    assert PruneSettings(recover=RecoverSettings(steps=100, loss="token", proximal=2.0)).describe().endswith(
        "+ recovery (100 steps, token loss, proximal 2)")


def test_a_nonfinite_loss_keeps_the_pruned_weights(tiny_folder):  # noqa: F811
    plain, _ = _prune(tiny_folder, None)
    blown, report = _prune(tiny_folder, RecoverSettings(steps=5, learning_rate=1e30, batch_size=2, eval_every=1))
    assert {r["block_recovery"]["stopped"] for r in report.layers} == {"nonfinite"}
    for name, w in _weights(plain).items():
        np.testing.assert_array_equal(_weights(blown)[name], w)


def test_recovery_resumes_bit_for_bit(tiny_folder, tmp_path):  # noqa: F811
    settings = RecoverSettings(steps=10, learning_rate=3e-3, batch_size=2, eval_every=5)
    whole, _ = _prune(tiny_folder, settings)

    def stop_after_first(b):
        if b == 0:
            raise KeyboardInterrupt

    with pytest.raises(PruneInterrupted):
        _prune(tiny_folder, settings, work_dir=str(tmp_path / "w"), after_block=stop_after_first)
    resumed, report = _prune(tiny_folder, settings, work_dir=str(tmp_path / "w"))
    assert report.resumed_blocks == 1
    for name, w in _weights(whole).items():
        np.testing.assert_array_equal(_weights(resumed)[name], w)


def test_bad_recover_settings_are_refused():
    for bad in (dict(steps=-1), dict(learning_rate=float("nan")), dict(holdout=1.0), dict(batch_size=0),
                dict(loss="mse"), dict(proximal=-1.0), dict(proximal=float("inf"))):
        with pytest.raises(ValueError, match="recover"):
            RecoverSettings(**bad)
    with pytest.raises(ValueError, match="recover must be"):
        PruneSettings(recover={"steps": 3})


def test_cli_recover(tiny_folder, tmp_path):  # noqa: F811
    import json

    from fw_jax import cli

    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text("Anne Elliot walked to the shore with her sister and the captain. " * 40)
    assert cli.main(["prune", tiny_folder, "--out", str(out), "--method", "wanda", "--recover", "--recover-steps", "6",
                     "--calib", str(calib), "--nsamples", "4", "--seqlen", "24", "-q"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["recover"]["steps"] == 6 and report["settings"]["recover"]["loss"] == "block"
    assert cli.main(["prune", tiny_folder, "--out", str(tmp_path / "tok"), "--method", "wanda", "--recover",
                     "--recover-steps", "4", "--recover-loss", "token", "--calib", str(calib), "--nsamples", "4",
                     "--seqlen", "24", "-q"]) == 0
    assert cli.main(["prune", tiny_folder, "--out", str(tmp_path / "prox"), "--method", "wanda", "--recover",
                     "--recover-steps", "4", "--recover-proximal", "3", "--calib", str(calib), "--nsamples", "4",
                     "--seqlen", "24", "-q"]) == 0
    assert json.loads((tmp_path / "prox" / "prune_report.json").read_text())["settings"]["recover"]["proximal"] == 3.0
    assert cli.main(["prune", tiny_folder, "--out", str(tmp_path / "pull"), "--method", "wanda", "--recover",
                     "--recover-steps", "4", "--recover-dense-pull", "2", "--calib", str(calib), "--nsamples", "4",
                     "--seqlen", "24", "-q"]) == 0
    pulled = json.loads((tmp_path / "pull" / "prune_report.json").read_text())
    assert pulled["settings"]["recover"]["dense_pull"] == 2.0 and all("block_recovery" in r for r in pulled["layers"])
    assert json.loads((tmp_path / "tok" / "prune_report.json").read_text())["settings"]["recover"]["loss"] == "token"
    assert all("block_recovery" in r for r in report["layers"])
    assert cli.main(["prune", tiny_folder, "--out", str(tmp_path / "o2"), "--recover", "--recover-lr", "nan",
                     "--calib", str(calib), "--nsamples", "4", "--seqlen", "24", "-q"]) == 2


def test_the_dense_pull_is_the_documented_penalty_and_holds_the_weights_near_dense(tiny_folder):  # noqa: F811
    """dense_pull=μ adds μ × the mean over the block's linear layers of
    Σ_ij e_j (Ŵ_ij − W_ij)² / Σ_ij e_j W_ij² (e = diag(G), W the dense weights) to recovery's
    training loss: the penalty is checked against float64 numpy on the block's own energies (a
    wrong weighting, an unweighted pull or one toward other weights gives another number), and a
    larger μ ends nearer the dense weights in that measure, the zeros staying zeros; without every
    layer's dense weights, a clear error names what is missing."""
    import jax.numpy as jnp
    from flax import nnx

    from fw_jax.pipeline import recover as recover_module
    from fw_jax.pipeline._training import linear_weights_filter

    loaded = models.load_model(tiny_folder)
    hidden = models.embed(loaded.model, jnp.asarray(calib_tokens(n=6)))
    target = models.run_block(loaded.model, 0, hidden)
    grams = models.block_grams(loaded.model, 0, hidden)
    dense = {layer.name: (np.asarray(layer.weight), np.asarray(jnp.diagonal(grams[layer.input_key])))
             for layer in models.block_linears(loaded.model, 0)}
    rng = np.random.default_rng(0)
    pruned = {n: ((w + 0.05 * rng.standard_normal(w.shape)) * (rng.random(w.shape) < 0.5)).astype(np.float32)
              for n, (w, _) in dense.items()}

    def penalty(weights):  # the documented pull, in float64
        return float(np.mean([np.sum(e * (weights[n].astype(np.float64) - w) ** 2) / np.sum(e * w.astype(np.float64) ** 2)
                              for n, (w, e) in dense.items()]))

    models.set_linear_weights(loaded.model, pruned)
    block = loaded.model.blocks[0]
    members = tuple(m for _, group in block.LINEAR_GROUPS for m in group)
    _, weights, _ = nnx.split(block, linear_weights_filter(f"{m}.weight" for m in members), ...)
    trees = recover_module._dense_trees(weights, f"{loaded.model.block_path}.0", dense)
    np.testing.assert_allclose(float(recover_module.distance_to_dense(weights, trees)), penalty(pruned), rtol=1e-5)

    distances = []
    for mu in (0.0, 1.0, 100.0):
        models.set_linear_weights(loaded.model, pruned)
        record = recover_module.recover_block(loaded.model, 0, hidden, target, RecoverSettings(
            steps=20, learning_rate=3e-3, batch_size=2, eval_every=20, patience=1, dense_pull=mu), dense)
        assert record["stopped"] == "steps" and record["loss_after"] < record["loss_before"]
        after = {layer.name: np.asarray(layer.weight) for layer in models.block_linears(loaded.model, 0)}
        for name, w in after.items():
            np.testing.assert_array_equal(w[pruned[name] == 0], 0.0)
        distances.append(penalty(after))
    assert distances[0] > distances[1] > distances[2], distances
    with pytest.raises(ValueError, match="missing: .*q_proj"):
        recover_module.recover_block(loaded.model, 0, hidden, target, RecoverSettings(steps=2, dense_pull=1.0),
                                     {n: d for n, d in dense.items() if "q_proj" not in n})


def test_the_pipeline_pulls_toward_the_checkpoints_own_weights(tiny_folder, monkeypatch):  # noqa: F811
    """prune_model with dense_pull hands recovery, for every layer, the checkpoint's dense weight
    (not the pruned or reconstructed one) and diag(G) of the block's calibration inputs (checked
    on block 0, whose inputs are the embeddings in any run)."""
    import jax.numpy as jnp

    from fw_jax.pipeline import recover as prune_module

    original = models.load_model(tiny_folder)
    dense_weights = {layer.name: np.asarray(layer.weight) for b in range(models.num_blocks(original.model))
                     for layer in models.block_linears(original.model, b)}
    tokens = calib_tokens(n=8)
    grams = models.block_grams(original.model, 0, models.embed(original.model, jnp.asarray(tokens)))
    energies = {layer.name: np.asarray(jnp.diagonal(grams[layer.input_key]))
                for layer in models.block_linears(original.model, 0)}
    seen = []
    real = prune_module.recover_block

    def spy(model, b, inputs, targets, settings, dense=None):
        seen.append(b)
        assert set(dense) == {layer.name for layer in models.block_linears(model, b)}
        for name, (weight, energy) in dense.items():
            np.testing.assert_array_equal(np.asarray(weight), dense_weights[name])
            if b == 0:
                np.testing.assert_allclose(np.asarray(energy), energies[name], rtol=1e-5)
        return real(model, b, inputs, targets, settings, dense)

    monkeypatch.setattr(prune_module, "recover_block", spy)
    loaded = models.load_model(tiny_folder)
    prune_model(loaded, tokens, PruneSettings(method="wanda", reconstruct=True, recover=RecoverSettings(
        steps=4, batch_size=2, dense_pull=1.0)), progress=False)
    assert seen == list(range(models.num_blocks(loaded.model)))


def test_recovery_warns_on_a_family_it_is_known_to_harm(tmp_path, tiny_folder, recwarn):  # noqa: F811
    """Gemma 3 (``Family.recover_warning``): a RecoveryWarning naming the model and the measured
    harm. A LLaMA-family model gets none."""
    import warnings

    from fw_jax.pipeline.recover import RecoveryWarning
    from models_fixtures import random_torch_model, tiny_config

    folder = tmp_path / "gemma"
    random_torch_model(tiny_config("gemma3"), seed=2).save_pretrained(folder, safe_serialization=True)
    settings = PruneSettings(method="wanda", recover=RecoverSettings(steps=2, batch_size=2, eval_every=1))
    with pytest.warns(RecoveryWarning, match=r"--recover on .*gemma.*results/recover_gemma3\.md"):
        prune_model(models.load_model(str(folder)), calib_tokens(n=4), settings, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecoveryWarning)
        prune_model(models.load_model(tiny_folder), calib_tokens(n=4), settings, progress=False)
