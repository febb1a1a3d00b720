"""Memory and time of summing calibration Gram matrices exactly (``distributed._ExactSum``).

Every Gram matrix of a block is the sum of one matrix per chunk of 4 calibration samples, added
in float64 with the rounding errors carried along, so that any number of processes gives the
same bits. This measures, for one LLaMA-2-7B-shaped block's matrices (4096² for the attention
and MLP inputs, 11008² for ``down_proj``'s, ``--chunks`` chunks each), the peak RSS and the time
of that sum done two ways in one run:

- ``whole arrays``: each addition on the whole matrices at once (fw_jax before this change), and
- ``sliced``: each addition in place, a slice of ``_SLICE`` elements at a time (fw_jax now).

Each way runs in a fresh subprocess, so its peak RSS is its own. The results are bit-identical
(checked). Writes ``results/exact_sum.md``::

    python benchmarks/bench_exact_sum.py              # 7B shapes
    python benchmarks/bench_exact_sum.py --tiny       # seconds (the test suite)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES_7B = {"attn_in": 4096, "attn_out": 4096, "mlp_in": 4096, "mlp_mid": 11008}


def _whole_two_sum(a, b):
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


class _WholeArrays:
    """The earlier implementation: every addition allocates whole-matrix temporaries."""

    def __init__(self):
        self.sums, self.errors = {}, {}

    def add(self, key, value):
        value = np.asarray(value, np.float64)
        if key not in self.sums:
            self.sums[key], self.errors[key] = value.copy(), np.zeros_like(value)
            return
        self.sums[key], e = _whole_two_sum(self.sums[key], value)
        self.errors[key] += e

    def result(self, key, dtype):
        return (self.sums[key] + self.errors[key]).astype(dtype)


def _child(way: str, shapes: dict, chunks: int) -> dict:
    from fw_jax.pipeline.distributed import _ExactSum

    rng = np.random.default_rng(0)
    total = _WholeArrays() if way == "whole arrays" else _ExactSum()
    seconds = 0.0
    digest = hashlib.sha256()
    for c in range(chunks):
        for key, n in shapes.items():
            x = rng.standard_normal((64, n), dtype=np.float32)
            gram = x.T @ x  # float32, as a chunk's Gram matrix comes from the device
            start = time.perf_counter()
            total.add(key, gram)
            seconds += time.perf_counter() - start
            del gram
    start = time.perf_counter()
    results = {key: total.result(key, np.float32) for key in shapes}
    seconds += time.perf_counter() - start
    for key in shapes:
        digest.update(results[key].tobytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GB
    return {"way": way, "seconds": seconds, "peak_rss_gb": peak, "digest": digest.hexdigest()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small matrices (seconds), for the tests")
    p.add_argument("--chunks", type=int, default=8, help="chunks of 4 samples (32 samples: 8)")
    p.add_argument("--out", default=str(ROOT / "results" / "exact_sum.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = {k: max(8, n // 64) for k, n in SHAPES_7B.items()} if args.tiny else SHAPES_7B
    if args.child:
        print(json.dumps(_child(args.child, shapes, args.chunks)))
        return 0
    rows = []
    for way in ("whole arrays", "sliced"):
        cmd = [sys.executable, __file__, "--child", way, "--chunks", str(args.chunks)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if rows[0]["digest"] != rows[1]["digest"]:
        raise AssertionError("the two ways gave different sums")
    base = rows[0]
    command = "python benchmarks/bench_exact_sum.py" + (" --tiny" if args.tiny else "") + f" --chunks {args.chunks}"
    lines = [
        "# Summing Gram matrices exactly: memory",
        "",
        f"`{command}` on {platform.machine()}, {platform.processor() or 'CPU'}, "
        f"{datetime.date.today().isoformat()}; written by `benchmarks/bench_exact_sum.py` (its docstring says what "
        "it measures). One block's Gram matrices of " + ("tiny" if args.tiny else "LLaMA-2-7B") + " shapes ("
        + ", ".join(f"{k} {n}²" for k, n in shapes.items()) + f"), {args.chunks} chunks each; each way in its own "
        "process, both in one run (compare the two rows: the machine may be running other work). The sums are "
        "bit-identical.",
        "",
        "| way | peak RSS (GB) | × whole arrays | time (s) | × whole arrays |",
        "|:--|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r['way']} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f} | "
                     f"{r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} |")
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
