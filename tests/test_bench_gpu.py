"""benchmarks/bench_gpu.py runs tiny on the CPU, so the GPU script does not rot between GPU runs."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_the_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    results = tmp_path / "gpu.json"
    assert bench_gpu.main(["--shape", "tiny", "--blocks", "2", "--nsamples", "2", "--seqlen", "16", "--max-iter", "5",
                           "--recipes", "defaults", "--gemm-size", "128", "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert set(data["gemm_tflops"]) == {"float32", "default (tf32 on NVIDIA)", "bfloat16"}
    (row,) = data["rows"]
    assert row["blocks"] == 2 and row["mean_iterations"] <= 5 and row["median_block_seconds"] > 0
    assert 0 < row["mean_error_vs_wanda"] < 2  # a finite ratio (the mask is fitted to the shrunk G, so not ≤ 1)
    md = results.with_suffix(".md").read_text()
    assert "No accelerator" in md or data["accelerator"]
