"""The lm-evaluation-harness adapter (fw_jax.pipeline.harness), offline: a local JSONL task read by
lm-eval's hf backend gives the accuracies fw_jax's own scorer gives on the same saved model."""

import json

import numpy as np
import pytest

from fw_jax.pipeline import harness
from fw_jax import models
from fw_jax.pipeline.tasks import evaluate_tasks, load_task, score_items
from test_pipeline_prune import tiny_folder  # noqa: F401  (fixture)

pytest.importorskip("lm_eval", reason="the [lm-eval] extra is not installed")


def _items(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the ship", "a letter", "her sister", "the garden", "Bath", "his friend", "the navy", "rain"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            choices = [" " + str(w) for w in rng.choice(words, size=4, replace=False)]
            f.write(json.dumps({"context": "Anne walked to", "choices": choices, "gold": int(rng.integers(4))}) + "\n")
    return str(path)


def test_local_task_through_lm_eval_matches_fw_jax_scoring(tiny_folder, tmp_path):  # noqa: F811
    path = _items(tmp_path / "walk.jsonl")
    ours = evaluate_tasks({"tiny": tiny_folder}, [load_task(path)], progress=False)["tiny"]["walk"]
    theirs = harness.run_lm_eval({"tiny": tiny_folder}, [path], batch_size=4, logliks=True)["tiny"][path]
    assert theirs["n"] == 24
    mine, _, _ = score_items(models.load_model(tiny_folder), load_task(path).items)
    np.testing.assert_allclose(np.asarray(theirs["logliks"]), np.asarray(mine), rtol=1e-4, atol=1e-4)
    # ASCII choices: lm-eval's per-character acc_norm is fw_jax's per-byte one
    assert theirs["acc"] == pytest.approx(ours.acc) and theirs["acc_norm"] == pytest.approx(ours.acc_norm)
    assert theirs["acc_stderr"] == pytest.approx(ours.acc_stderr, rel=1e-6)


def test_clear_errors(tiny_folder, tmp_path):  # noqa: F811
    with pytest.raises(harness.HarnessError, match="no task"):
        harness.run_lm_eval({"tiny": tiny_folder}, ["no_such_task_xyz"])
    with pytest.raises(harness.HarnessError, match="Hugging Face folder"):
        harness.run_lm_eval({"x": str(tmp_path)}, [_items(tmp_path / "t.jsonl", n=2)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" b"], "gold": 3}\n')
    with pytest.raises(Exception, match="bad.jsonl"):
        harness.run_lm_eval({"tiny": tiny_folder}, [str(bad)])


def test_cli_eval_with_lm_eval(tiny_folder, tmp_path, capsys):  # noqa: F811
    from fw_jax import cli

    path = _items(tmp_path / "walk.jsonl", n=8)
    out = tmp_path / "acc.json"
    assert cli.main(["eval", tiny_folder, "--lm-eval", path, "--lm-eval-limit", "5", "--json", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "lm-eval walk.jsonl acc" in printed and "at most 5 items" in printed
    record = json.loads(out.read_text())["lm_eval"]
    assert record["limit"] == 5 and record["results"][next(iter(record["results"]))][path]["n"] == 5
