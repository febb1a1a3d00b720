"""The llm-compressor benchmark runs tiny, so that it does not rot (speed is never asserted here)."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_peers.py"
TINY = ["--tiny", "--methods", "wanda", "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32",
        "--max-windows", "2"]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _peers_python():
    """An interpreter that has llmcompressor: $FW_JAX_PEERS_PYTHON, or this one if it has it."""
    named = os.environ.get("FW_JAX_PEERS_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("llmcompressor") is not None else None


def _run(tmp_path, *extra):
    out = tmp_path / "results" / "peers"
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--work", str(tmp_path / "work"), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def _table_row(text, method, tool):
    line = next(line for line in text.splitlines() if line.startswith(f"| {method} | {tool} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _check_measured(row):
    assert row["wall_s"] > 0 and row["call_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_gb"] > 0, row
    assert row["wait4_maxrss_gb"] >= row["peak_rss_gb"] * 0.99 and row["mean_load"] >= 0, row
    assert row["wall_s"] >= row["call_s"], row  # the call is part of the process
    for text in ("Persuasion", "pydoc-eval"):
        assert math.isfinite(row["ppl"][text]) and row["ppl"][text] > 1, row


def test_the_fw_jax_side_runs_tiny_and_writes_every_field(tmp_path):
    record, text = _run(tmp_path, "--tools", "fw_jax")
    for key in ("command", "date", "machine", "versions", "calibration", "evaluation", "dense", "rows", "ratios"):
        assert key in record, key
    assert record["versions"]["fw_jax side"]["jax"] and record["versions"]["llm-compressor side"] is None
    assert record["calibration"]["windows"] == 4 and record["calibration"]["seqlen"] == 32
    (row,) = record["rows"]
    assert (row["method"], row["tool"]) == ("wanda", "fw_jax")
    _check_measured(row)
    assert row["windows_checked"] == 4  # the child compared the windows it calibrated on with the saved ones
    # Wanda keeps half of every row; the dense model has no zeros
    assert row["zeros"]["rows_at_budget"] == row["zeros"]["rows"] > 0 and row["zeros"]["row_max"] == 0.5
    assert record["dense"]["zeros"]["layer_max"] == 0
    cells = _table_row(text, "wanda", "fw_jax")
    assert all(float(c) > 0 for c in cells[2:9]), cells  # wall, call, CPU s, load, RSS, both perplexities
    assert record["ratios"] == [] and "llm-compressor was not run" in text
    assert (tmp_path / "work" / "wanda-fw_jax" / "prune_report.json").is_file()  # the pruned folder is kept


@pytest.mark.skipif(_peers_python() is None,
                    reason="llmcompressor is not importable here (set FW_JAX_PEERS_PYTHON to an interpreter that has it)")
def test_both_tools_run_tiny_on_the_same_windows_and_wanda_agrees(tmp_path):
    record, text = _run(tmp_path, "--peers-python", _peers_python())
    rows = {r["tool"]: r for r in record["rows"]}
    assert set(rows) == {"fw_jax", "llmcompressor"}
    for row in rows.values():
        _check_measured(row)
        assert row["zeros"]["rows_at_budget"] == row["zeros"]["rows"], row  # 50% of every row, both tools
    assert rows["llmcompressor"]["windows_checked"] == 4 and rows["llmcompressor"]["versions"]["llmcompressor"]
    for data in ("Persuasion", "pydoc-eval"):  # one algorithm on the same windows: the same model, up to float ties
        ours, theirs = rows["fw_jax"]["ppl"][data], rows["llmcompressor"]["ppl"][data]
        assert abs(ours - theirs) <= 1e-2 * theirs, (data, ours, theirs)
    (ratio,) = record["ratios"]
    assert ratio["fw_jax"] == ratio["llmcompressor"] == "wanda"
    assert ratio["ratio"] == pytest.approx(rows["fw_jax"]["wall_s"] / rows["llmcompressor"]["wall_s"])
    assert "fw_jax wanda / llm-compressor wanda" in text


def test_goals_are_judged_on_wall_seconds():
    import bench_peers as b

    rows = [{"method": "sparsegpt", "tool": "llmcompressor", "wall_s": 100.0, "call_s": 50.0, "cpu_s": 150.0},
            {"method": "sparsefw", "tool": "fw_jax", "wall_s": 160.0, "call_s": 60.0, "cpu_s": 210.0},
            {"method": "sparsegpt", "tool": "fw_jax", "wall_s": 90.0, "call_s": 80.0}]
    judged = {(g["fw_jax"], g["llmcompressor"]): g for g in b.ratios(rows)}
    assert set(judged) == {("sparsegpt", "sparsegpt"), ("sparsefw", "sparsegpt")}  # no Wanda run, no Wanda goal
    assert judged[("sparsefw", "sparsegpt")]["ratio"] == pytest.approx(1.6)
    assert judged[("sparsefw", "sparsegpt")]["met"] is False  # 1.6 > 1.5
    assert judged[("sparsefw", "sparsegpt")]["cpu_ratio"] == pytest.approx(1.4)  # 210 / 150, beside it
    assert judged[("sparsefw", "sparsegpt")]["met_on_cpu"] is True
    assert judged[("sparsegpt", "sparsegpt")]["cpu_ratio"] is None  # not measured for one of the two
    assert judged[("sparsegpt", "sparsegpt")]["met"] is True and judged[("sparsegpt", "sparsegpt")]["call_ratio"] == 1.6


def test_a_work_folder_with_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--tools", "fw_jax", "--work", str(tmp_path),
                           "--out", str(tmp_path / "peers")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "is not an empty folder" in done.stderr, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
