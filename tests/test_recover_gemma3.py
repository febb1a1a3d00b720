"""benchmarks/recover_gemma3.py runs on a tiny model: its readings of a block's error are the
documented ones (checked in numpy), recovery's record is the pipeline's, and the page is whole."""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import recover_gemma3  # noqa: E402
from fw_jax import models  # noqa: E402
from fw_jax.pipeline import PruneSettings, prune_model  # noqa: E402
from test_pipeline_prune import calib_tokens, tiny_folder  # noqa: E402,F401  (fixture)


def test_the_three_readings_of_an_error():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((2, 5, 8))
    target[..., 3] *= 30.0  # a massive channel
    out = target + 0.1 * rng.standard_normal(target.shape)
    got = recover_gemma3.errors(out, target)
    block = ((out - target) ** 2).sum() / (target**2).sum()
    scale = 1 / np.sqrt((target**2).mean(axis=(0, 1)))
    channel = (((out - target) * scale) ** 2).sum() / ((target * scale) ** 2).sum()
    unit = lambda x: x / np.sqrt((x**2).mean(-1, keepdims=True))  # noqa: E731
    normed = ((unit(out) - unit(target)) ** 2).sum() / (unit(target) ** 2).sum()
    np.testing.assert_allclose([got["block loss"], got["per channel"], got["per position, RMS-normalised"]],
                               [block, channel, normed], rtol=1e-4)
    assert channel > 10 * block  # the massive channel hides the others' error from the block loss


def test_the_benchmark_runs_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    """On texts of its own (a clone need not sit beside ``../shared/corpora``)."""
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "austen_emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich. " * 60, encoding="utf-8")
    (corpora / "austen_persuasion.txt").write_text("Sir Walter Elliot, of Kellynch Hall. " * 60, encoding="utf-8")
    monkeypatch.setattr(recover_gemma3, "CORPORA", corpora)
    monkeypatch.setattr(recover_gemma3, "calibration_books", lambda: [str(corpora / "austen_emma.txt")])
    loaded = models.load_model(tiny_folder)
    prune_model(loaded, calib_tokens(n=4), PruneSettings(method="wanda"), progress=False)
    pruned = tmp_path / "pruned"
    models.save_hf_folder(loaded, pruned)
    out = tmp_path / "r"
    assert recover_gemma3.main(["--dense", tiny_folder, "--pruned", str(pruned), "--block", "1", "--lrs", "3e-3",
                                "--nsamples", "2", "--seqlen", "32", "--windows", "2", "--results", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    row = result["rows"][0]
    assert row["record"]["stopped"] in ("steps", "early", "worse")
    np.testing.assert_allclose(row["calibration before"]["block loss"], row["record"]["loss_before"], rtol=1e-4)
    np.testing.assert_allclose(row["calibration after"]["block loss"], row["record"]["loss_after"], rtol=1e-4)
    assert np.isfinite(row["next-token loss before"]) and np.isfinite(row["next-token loss after"])
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Recovery on Gemma 3 270M: one block") and text.count("| 0.003 |") == 3
