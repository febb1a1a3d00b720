"""The Tunix benchmark runs tiny, so that it does not rot (speed is never asserted here)."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("tunix") is None, reason="google-tunix is not installed")
def test_the_tunix_benchmark_runs_tiny_and_both_front_ends_agree(tmp_path):
    out = tmp_path / "tunix.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tunix.py"), "--tiny", "--methods", "wanda",
                           "--nsamples", "4", "--seqlen", "16", "--eval-windows", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| wanda |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5].startswith("0 of "), row  # Wanda on a random model: no ties, the same masks
    ppl_tunix, ppl_fw_jax = float(cells[9]), float(cells[10])
    assert abs(ppl_tunix - ppl_fw_jax) <= 1e-4 * ppl_fw_jax, row
    difference = float(re.search(r"max \|Tunix − fw_jax\| = ([0-9.e+-]+)", text).group(1))
    assert difference < 1e-3, text
