"""benchmarks/block_error_profile.py on a tiny model: zero error against itself, and the parts
of the error add up as the table says, so the diagnostic does not rot."""

import pathlib
import sys

import numpy as np

from fw_jax import models
from models_fixtures import random_torch_model, tiny_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import block_error_profile  # noqa: E402


def test_profile_is_zero_for_the_dense_model_and_its_shares_are_fractions(tmp_path):
    folder = tmp_path / "tiny"
    random_torch_model(tiny_config("llama"), seed=1).save_pretrained(folder, safe_serialization=True)
    dense = models.load_model(str(folder), dtype="float32", tokenizer=False).model
    pruned = models.load_model(str(folder), dtype="float32", tokenizer=False).model
    tokens = np.random.default_rng(0).integers(3, 100, size=(3, 16)).astype(np.int32)
    assert all(r["relative error"] == 0 for r in block_error_profile.profile(dense, dense, tokens))

    w = pruned.blocks[0].mlp.down_proj.weight
    w[...] = w[...].at[:, ::2].set(0)  # prune half of one layer: block 0 and all after it err
    rows = block_error_profile.profile(dense, pruned, tokens)
    assert len(rows) == 2 and all(r["relative error"] > 0 for r in rows)
    for r in rows:
        for key in ("first position's share of target", "first position's share of error",
                    "top-3 channels' share of target", "top-3 channels' share of error"):
            assert 0 < r[key] < 1
        # the first position's and the others' errors make up the whole
        t0, e0 = r["first position's share of target"], r["first position's share of error"]
        rest = r["relative error without first position"]
        np.testing.assert_allclose(r["relative error"] * (1 - e0), rest * (1 - t0), rtol=1e-9)
