"""A row-sharded solve over 4 (virtual CPU) devices equals the single-device solve."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import fw_jax
    from fw_jax.solver import shard_rows
    sys.path.insert(0, "tests")
    from solver_problems import correlated_problem

    assert jax.device_count() == 4, jax.devices()
    weight, gram = correlated_problem(np.random.default_rng(0), 16, 24)
    out = {}
    for name, budget in [("row", 12), ("nm", fw_jax.NM(2, 4)), ("layer", fw_jax.LayerBudget(150))]:
        single = fw_jax.solve_layer(weight, gram, budget, options=fw_jax.SolverOptions(max_iter=60))
        w, g = shard_rows(weight, gram)
        sharded = fw_jax.solve_layer(w, g, budget, options=fw_jax.SolverOptions(max_iter=60))
        out[name] = dict(
            same_mask=bool(np.array_equal(np.asarray(single.mask), np.asarray(sharded.mask))),
            loss=[float(single.loss), float(sharded.loss)],
            bound=[float(single.lower_bound), float(sharded.lower_bound)],
            shards=len(sharded.mask.sharding.device_set),
        )
    # The layer budget's global threshold (the LMO of every iteration) is a distributed
    # selection: the compiled sharded oracle exchanges counts and per-row totals, never the matrix.
    import re
    import jax.numpy as jnp
    from fw_jax.solver._lmo import TopKLMO
    w, g = shard_rows(weight, gram)
    lmo = TopKLMO(150, "bisect")
    hlo = jax.jit(lambda x: lmo.unit(x, jnp.zeros(x.shape, bool))).lower(w).compile().as_text()
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"= \\w+\\[([0-9,]*)\\][^ ]* (all-gather|all-reduce|all-to-all|collective-permute)", line)
        if m:
            sizes.append(int(np.prod([int(d) for d in m.group(1).split(",") if d] or [1])))
    out["lmo_collectives"] = sizes
    print(json.dumps(out))
    """
)


def run_on_four_devices(script):
    """Run ``script`` in a fresh process with 4 virtual CPU devices; its last line of output, as JSON."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_row_sharded_solve_equals_single_device():
    results = run_on_four_devices(SCRIPT)
    sizes = results.pop("lmo_collectives")
    assert sizes and max(sizes) < 16 * 24 // 4, sizes  # scalars and per-row totals only
    assert set(results) == {"row", "nm", "layer"}
    for name, r in results.items():
        assert r["same_mask"], name
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-9 * r["loss"][0]
        assert abs(r["bound"][0] - r["bound"][1]) <= 1e-9 * r["loss"][0]
        assert r["shards"] == 4


PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    sys.path.insert(0, "tests")
    from fw_jax import models
    import fw_jax
    from fw_jax.pipeline import PruneSettings, SparseFW, prune_model
    from models_fixtures import random_torch_model, tiny_config
    from test_pipeline_data import char_tokenizer
    import tempfile

    assert jax.device_count() == 4
    folder = tempfile.mkdtemp()
    random_torch_model(tiny_config("llama", intermediate_size=64, max_position_embeddings=128), seed=3).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    tokens = np.random.default_rng(0).integers(3, 100, size=(4, 24)).astype(np.int32)
    weights = []
    for devices in (None, jax.devices()):
        loaded = models.load_model(folder)
        prune_model(loaded, tokens, PruneSettings(method=SparseFW(options=fw_jax.SolverOptions(max_iter=20)), sparsity=0.5), progress=False, devices=devices)
        weights.append({l.name: np.asarray(l.weight) for b in range(models.num_blocks(loaded.model))
                        for l in models.block_linears(loaded.model, b)})
    same = all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    print(json.dumps(dict(same=same, layers=len(weights[0]))))
    """
)


def test_layers_of_a_block_on_four_devices_give_the_same_model():
    result = run_on_four_devices(PIPELINE_SCRIPT)
    assert result["same"] and result["layers"] > 0
