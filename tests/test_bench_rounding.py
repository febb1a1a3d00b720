"""benchmarks/bench_rounding.py runs tiny, both selections agree, and its section is whole."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_rounding  # noqa: E402


def test_the_rounding_benchmark_runs_tiny_and_keeps_other_sections(tmp_path):
    results = tmp_path / "scale.json"
    results.write_text(json.dumps({"7b": {"rows": []}}))
    results.with_suffix(".md").write_text("# Scale\n\n## Earlier\n\nkept\n")
    assert bench_rounding.main(["--tiny", "--repeats", "1", "--results", str(results)]) == 0
    saved = json.loads(results.read_text())
    assert saved["7b"] == {"rows": []}
    rows = saved["rounding_tiny"]["rows"]
    assert len(rows) == 9 and all(r["same_selection"] for r in rows)
    for r in rows:
        half = r["shape"][1] // 2
        assert r["kept_per_row"] == [int(0.9 * half) if r["selection"].startswith("fixed") else half]
        assert r["threshold_seconds"] > 0 and r["lexsort_seconds"] > 0
    text = results.with_suffix(".md").read_text()
    assert text.startswith("# Scale\n\n## Earlier\n\nkept\n")
    assert text.count(bench_rounding.TITLES["tiny"]) == 1 and "Per block (4 + 2 + 1 layers)" in text
