"""The exact-sum benchmark runs tiny, so that it does not rot (speed is never asserted here)."""

import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_exact_sum_benchmark_runs_tiny_and_both_ways_agree(tmp_path):
    out = tmp_path / "exact_sum.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_exact_sum.py"), "--tiny", "--chunks", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr  # it raises if the two ways' sums differ
    text = out.read_text()
    assert "| whole arrays |" in text and "| sliced |" in text and "bit-identical" in text
