"""benchmarks/solve_memory.py runs tiny: chunked and whole solves agree, chunks take less
temporary memory, and its section joins the others."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import solve_memory  # noqa: E402


def test_the_solve_memory_benchmark_runs_tiny_and_keeps_other_sections(tmp_path):
    results = tmp_path / "scale.json"
    results.write_text(json.dumps({"7b": {"rows": []}}))
    results.with_suffix(".md").write_text("# Scale\n\n## Earlier\n\nkept\n")
    assert solve_memory.main(["--tiny", "--results", str(results)]) == 0
    saved = json.loads(results.read_text())
    assert saved["7b"] == {"rows": []}
    rows = saved["solve_memory_tiny"]["rows"]
    assert len(rows) == 3
    for r in rows:
        assert r["rows_per_chunk"] == solve_memory.TINY_CHUNK and r["same_mask"] and r["differing_rows"] == 0
        assert r["chunked_temp_gb"] < r["whole_temp_gb"]
        assert abs(r["chunked_loss"] - r["whole_loss"]) <= 1e-5 * r["whole_loss"]
    text = results.with_suffix(".md").read_text()
    assert text.startswith("# Scale\n\n## Earlier\n\nkept\n") and text.count(solve_memory.TITLES["tiny"]) == 1
