"""Pruning across two processes on jax.distributed (CPU collectives on localhost) gives the model
one process gives (issue 16)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from models_fixtures import folder_tensors
from test_pipeline_prune import LINEARS, tiny_folder  # noqa: F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _prune(tiny_folder, out, *extra):
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    return [sys.executable, "-m", "fw_jax.cli", "prune", tiny_folder, "--out", str(out), "--calib", calib,
            "--nsamples", "6", "--seqlen", "32", "--method", "sparsefw", "--max-iter", "20", "-q", *extra]


@pytest.mark.parametrize("processes", [2])
def test_two_processes_prune_the_model_one_process_prunes(tiny_folder, tmp_path, processes):  # noqa: F811
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one = subprocess.run(_prune(tiny_folder, tmp_path / "one"), env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    runs = [subprocess.Popen(_prune(tiny_folder, tmp_path / "many", "--coordinator", f"localhost:{port}",
                                    "--num-processes", str(processes), "--process-id", str(i)),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
    outputs = [r.communicate(timeout=600) for r in runs]
    for r, (_, err) in zip(runs, outputs):
        assert r.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]  # process 0 wrote, nobody else
    report = json.loads((tmp_path / "many" / "prune_report.json").read_text())
    assert report["processes"] == processes and report["calibration"]["nsamples"] == 6
    a, b = folder_tensors(str(tmp_path / "one")), folder_tensors(str(tmp_path / "many"))
    assert a.keys() == b.keys()
    agree = []
    for name in a:
        if name.endswith(tuple(f"{l}.weight" for l in LINEARS)):
            same = (a[name] != 0) == (b[name] != 0)
            agree.append(same.mean())
            np.testing.assert_array_equal(a[name][same & (a[name] != 0)], b[name][same & (b[name] != 0)])
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # never pruned: identical
    # Masks agree except where the Gram matrices' summation order (per process, then across) breaks a tie.
    assert np.mean(agree) > 0.99, agree
    print(f"mask agreement {np.mean(agree):.5f} over {len(agree)} layers")
