"""Whole-model fine-tuning of a pruned model (fw_jax.pipeline.finetune, fw-jax finetune): masks
kept bit for bit, the held-out loss equal to a PyTorch computation and lowered, distillation,
resume bit for bit, a non-finite loss keeping the input's weights, and refusals."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
import transformers

from fw_jax import models
from fw_jax.pipeline import FinetuneInterrupted, FinetuneSettings, PruneSettings, finetune, prune_to_folder
from fw_jax.pipeline.data import calibration_tokens, load_documents
from fw_jax.pipeline.output import OutputError
from test_pipeline_prune import tiny_folder  # noqa: F401  (fixture)

FAST = dict(steps=6, learning_rate=3e-3, warmup=1, batch_size=2, seqlen=24, nsamples=6, heldout=4, eval_every=2,
            save_every=2)


@pytest.fixture(scope="module")
def pruned(tiny_folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pruned") / "wanda"
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    prune_to_folder(tiny_folder, str(out), PruneSettings(method="wanda"), calib=calib, nsamples=4, seqlen=24,
                    progress=False)
    return str(out), calib


def _linear_weights(folder):
    loaded = models.load_model(folder)
    return {layer.name: np.asarray(layer.weight) for b in range(models.num_blocks(loaded.model))
            for layer in models.block_linears(loaded.model, b)}


def _torch_heldout_ce(folder, data, settings):
    """Mean next-token cross-entropy of the held-out windows, by transformers + PyTorch."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokens = calibration_tokens(tokenizer, load_documents(data), settings.nsamples + settings.heldout,
                                settings.seqlen, settings.seed)[settings.nsamples:]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits[:, :-1].double()
    targets = torch.as_tensor(tokens[:, 1:], dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


def test_finetune_keeps_masks_and_lowers_the_heldout_loss(pruned, tmp_path):
    folder, calib = pruned
    settings = FinetuneSettings(**FAST)
    report = finetune(folder, str(tmp_path / "ft"), calib, settings, progress=False)
    assert report["heldout_before"] == pytest.approx(_torch_heldout_ce(folder, calib, settings), rel=1e-4)
    assert report["heldout_after"] < report["heldout_before"] and report["kept_step"] > 0
    assert report["heldout_after"] == pytest.approx(_torch_heldout_ce(str(tmp_path / "ft"), calib, settings), rel=1e-4)
    before, after = _linear_weights(folder), _linear_weights(str(tmp_path / "ft"))
    for name, w in before.items():
        np.testing.assert_array_equal(after[name] != 0, w != 0)  # the mask, bit for bit
    assert any(not np.array_equal(after[n], w) for n, w in before.items())
    saved = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert saved["kept_step"] == report["kept_step"] and len(saved["losses"]) == settings.steps


def test_distillation_from_the_dense_model(pruned, tiny_folder, tmp_path):  # noqa: F811
    """With the teacher and distill = 1 the loss is the KL from the dense model: positive for the
    pruned model, and it goes down."""
    folder, calib = pruned
    settings = FinetuneSettings(**FAST)
    report = finetune(folder, str(tmp_path / "kd"), calib, settings, teacher=tiny_folder, progress=False)
    assert report["heldout_before"] > 0 and report["heldout_after"] < report["heldout_before"]
    self_taught = finetune(tiny_folder, str(tmp_path / "self"), calib, settings, teacher=tiny_folder, progress=False)
    assert self_taught["heldout_before"] == pytest.approx(0.0, abs=1e-6)  # KL of a model from itself


def _torch_heldout_kl(student, teacher, data, settings):
    """τ²-scaled mean KL(teacher ‖ student) of the next-token distributions at temperature τ, by
    transformers + PyTorch, on the held-out windows."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    tokens = torch.as_tensor(calibration_tokens(tokenizer, load_documents(data), settings.nsamples + settings.heldout,
                                                settings.seqlen, settings.seed)[settings.nsamples:], dtype=torch.long)
    tau = settings.temperature
    with torch.no_grad():
        s, t = (transformers.AutoModelForCausalLM.from_pretrained(f, torch_dtype=torch.float32).eval()(tokens)
                .logits[:, :-1].double() / tau for f in (student, teacher))
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                    reduction="none").sum(-1)
    return float(kl.mean()) * tau**2


def test_distillation_at_a_temperature_equals_pytorch(pruned, tiny_folder, tmp_path):  # noqa: F811
    """The chunked loss (5 positions at a time, the last chunk padded) with τ = 2 is PyTorch's KL."""
    folder, calib = pruned
    settings = FinetuneSettings(**dict(FAST, steps=1, temperature=2.0, loss_chunk=5))
    report = finetune(folder, str(tmp_path / "kd2"), calib, settings, teacher=tiny_folder, progress=False)
    assert report["heldout_before"] == pytest.approx(_torch_heldout_kl(folder, tiny_folder, calib, settings), rel=1e-4)


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_remat_and_chunked_loss_change_nothing_but_memory(pruned, tiny_folder, distill):  # noqa: F811
    """Rematerialised blocks and a loss computed chunk by chunk give the plain computation's loss
    and gradients (float32 rounding), with and without a teacher."""
    import jax
    from flax import nnx

    from fw_jax.pipeline._training import linear_weights_filter

    ft = importlib.import_module("fw_jax.pipeline.finetune")  # the module, not the function of its name

    folder, calib = pruned
    loaded, dense = models.load_model(folder), models.load_model(tiny_folder)
    graphdef, weights, rest = nnx.split(loaded.model, linear_weights_filter(ft._trained(loaded.model)), ...)
    teacher_graphdef, teacher_state = nnx.split(dense.model)
    tokens = calibration_tokens(loaded.tokenizer, load_documents(calib), 3, 24, 0)
    results = []
    for remat, chunk in ((False, 0), (True, 7), (True, 0), (False, 30)):
        settings = FinetuneSettings(**dict(FAST, remat=remat, loss_chunk=chunk, distill=distill, temperature=1.5))
        _, _, evaluate = ft._compiled(graphdef, teacher_graphdef, settings)
        value, grads = jax.value_and_grad(lambda w: evaluate(w, rest, teacher_state, tokens)[0])(weights)
        results.append((float(value), jax.tree.leaves(grads)))
    (plain, plain_grads), *others = results
    assert plain > 0
    for value, grads in others:
        assert value == pytest.approx(plain, rel=1e-5)
        for g, ref in zip(grads, plain_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_finetune_resumes_bit_for_bit(pruned, tmp_path):
    folder, calib = pruned
    settings = FinetuneSettings(**FAST)
    finetune(folder, str(tmp_path / "whole"), calib, settings, progress=False)

    def stop(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(FinetuneInterrupted) as stopped:
        finetune(folder, str(tmp_path / "cut"), calib, settings, progress=False, after_step=stop)
    assert stopped.value.step == 4  # the last checkpoint (save_every = 2)
    assert os.path.isdir(str(tmp_path / "cut") + ".partial")
    finetune(folder, str(tmp_path / "cut"), calib, settings, progress=False)
    assert not os.path.exists(str(tmp_path / "cut") + ".partial")
    whole, cut = _linear_weights(str(tmp_path / "whole")), _linear_weights(str(tmp_path / "cut"))
    for name, w in whole.items():
        np.testing.assert_array_equal(cut[name], w)


def test_a_nonfinite_loss_keeps_the_inputs_weights(pruned, tmp_path):
    folder, calib = pruned
    report = finetune(folder, str(tmp_path / "nan"), calib,
                      FinetuneSettings(**dict(FAST, learning_rate=1e30)), progress=False)
    assert report["stopped"] == "nonfinite" and report["kept_step"] == 0
    for name, w in _linear_weights(folder).items():
        np.testing.assert_array_equal(_linear_weights(str(tmp_path / "nan"))[name], w)


def test_finetune_refusals(pruned, tmp_path):
    folder, calib = pruned
    for bad in (dict(steps=0), dict(learning_rate=float("nan")), dict(distill=2.0), dict(temperature=0.0),
                dict(remat="yes"), dict(loss_chunk=-1)):
        with pytest.raises(ValueError, match="finetune"):
            FinetuneSettings(**bad)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="was not written by fw_jax"):
        finetune(folder, str(mine), calib, FinetuneSettings(**FAST), progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match="never writes over its input"):
        finetune(folder, folder, calib, FinetuneSettings(**FAST), progress=False)


def test_cli_finetune(pruned, tmp_path, capsys):
    from fw_jax import cli

    folder, calib = pruned
    out = tmp_path / "cli"
    args = ["finetune", folder, "--data", calib, "--out", str(out), "--steps", "4", "--lr", "3e-3", "--warmup", "1",
            "--batch-size", "2", "--seqlen", "24", "--nsamples", "4", "--heldout", "2", "--eval-every", "2", "-q",
            "--no-remat", "--loss-chunk", "5"]
    assert cli.main(args) == 0
    assert "held-out loss" in capsys.readouterr().out
    recorded = json.loads((out / "finetune_report.json").read_text())["settings"]
    assert (recorded["steps"], recorded["remat"], recorded["loss_chunk"]) == (4, False, 5)
    assert cli.main(args) == 2  # a finished output is not replaced without --overwrite
    assert cli.main(args + ["--overwrite"]) == 0
    assert cli.main(["finetune", folder, "--data", calib, "--distill", "0.5", "--out", str(tmp_path / "x")]) == 2
