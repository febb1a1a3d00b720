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
    from fw_jax.solver._sharding import shard_rows
    sys.path.insert(0, "tests")
    from solver_problems import correlated_problem

    assert jax.device_count() == 4, jax.devices()
    weight, gram = correlated_problem(np.random.default_rng(0), 16, 24)
    out = {}
    for name, budget in [("row", 12), ("nm", fw_jax.NM(2, 4))]:
        single = fw_jax.solve_layer(weight, gram, budget, max_iter=60)
        w, g = shard_rows(weight, gram)
        sharded = fw_jax.solve_layer(w, g, budget, max_iter=60)
        out[name] = dict(
            same_mask=bool(np.array_equal(np.asarray(single.mask), np.asarray(sharded.mask))),
            loss=[float(single.loss), float(sharded.loss)],
            bound=[float(single.lower_bound), float(sharded.lower_bound)],
            shards=len(sharded.mask.sharding.device_set),
        )
    print(json.dumps(out))
    """
)


def test_row_sharded_solve_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["same_mask"], name
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-9 * r["loss"][0]
        assert abs(r["bound"][0] - r["bound"][1]) <= 1e-9 * r["loss"][0]
        assert r["shards"] == 4
