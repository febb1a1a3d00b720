"""benchmarks/bench_scale.py runs end to end on a tiny model, so the scale benchmark does not rot."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402


def test_the_scale_benchmark_runs_tiny(tmp_path):
    results = tmp_path / "scale.json"
    assert bench_scale.main(["--tiny", "--out", str(tmp_path / "work"), "--results", str(results), "--blocks", "2",
                             "--sparsefw-blocks", "1", "--sparsefw-iter", "2", "--nsamples", "2",
                             "--seqlen", "16"]) == 0
    rows = json.loads(results.read_text())["tiny"]["rows"]
    assert [(r["method"], r["blocks"]) for r in rows] == [("wanda", 2), ("sparsefw", 1)]
    for r in rows:
        assert r["input_dtypes"] == r["output_dtypes"] == ["bfloat16"]
        assert 0.5 < r["output_gb"] / r["input_gb"] < 1.1 and r["peak_rss_gb"] > 0
    table = results.with_suffix(".md").read_text()
    assert "| tiny, 2 blocks |" in table and "bfloat16" in table
    # a rerun of one method keeps the other's row, and other sections of the markdown (the profile's) stay
    results.with_suffix(".md").write_text(table + "\n## Where a tiny block's time goes\n\nkept\n")
    wanda = rows[0]
    assert bench_scale.main(["--tiny", "--out", str(tmp_path / "work"), "--results", str(results), "--blocks", "2",
                             "--sparsefw-blocks", "1", "--sparsefw-iter", "2", "--nsamples", "2",
                             "--seqlen", "16", "--methods", "sparsefw"]) == 0
    rerun = json.loads(results.read_text())["tiny"]["rows"]
    assert [r["method"] for r in rerun] == ["wanda", "sparsefw"] and rerun[0] == wanda
    again = results.with_suffix(".md").read_text()
    assert again.count("## tiny (the test suite's run)") == 1 and again.endswith("## Where a tiny block's time goes\n\nkept\n")
