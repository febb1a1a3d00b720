"""The variant benchmark (also the GPU check) runs end to end on CPU at tiny sizes."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_variant_benchmark_runs_and_writes_its_table(tmp_path):
    import bench_variants

    out = tmp_path / "variants"
    rows = bench_variants.main(["--preset", "tiny", "--out", str(out), "--step", "exact", "--lmo", "bisect"])
    assert {r["precision"] for r in rows} == {"default", "bfloat16"}
    for r in rows:
        assert r["ms_per_iter"] > 0 and r["published_ms_per_iter"] > 0 and r["gemm_tflops"] > 0
        assert 0 < r["error_vs_wanda"] <= 1 + 1e-6  # never worse than the warm start
    full = [r for r in rows if r["precision"] == "default"][0]
    assert full["error_vs_full_precision"] == 0.0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| exact | bisect |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_threshold_hint_benchmark_runs_and_finds_the_same_masks(tmp_path):
    import bench_lmo_hint

    out = tmp_path / "lmo_hint"
    rows = bench_lmo_hint.main(["--tiny", "--iterations", "20", "--repeats", "1", "--out", str(out)])
    assert [r["solver"] for r in rows] == ["solve_layer (defaults)", "sparsefw_published (20 it)"]
    for r in rows:
        assert r["same_mask"] and r["cold_s"] > 0 and r["hinted_s"] > 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| synthetic 48×64 |" in out.with_suffix(".md").read_text()


def test_psd_check_benchmark_runs_and_finds_its_grams_psd(tmp_path):
    import bench_psd_check

    out = tmp_path / "psd_check"
    rows = bench_psd_check.main(["--tiny", "--repeats", "1", "--out", str(out)])
    assert [r["d"] for r in rows] == [64, 128]
    for r in rows:
        assert r["lanczos_s"] > 0 and r["cholesky_s"] > 0 and r["cholesky_ok"]
        assert r["smallest_over_largest"] > -1e-4  # built PSD; the check must let them pass
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| 64 |" in out.with_suffix(".md").read_text()
