"""Prune a LLaMA-2-7B-shaped bfloat16 checkpoint out of core on this machine (issue 16).

Builds the checkpoint once (random weights, N(0, 0.02), norms 1; sharded safetensors with an
index; SmolLM2's tokenizer, the one that installs offline, so the vocabulary is 49152 instead of
LLaMA-2's 32000), then runs ``fw-jax prune`` on it in a child process per method and records the
wall time, the time per block, the peak RSS of the child, and the output's size and dtypes.

    python benchmarks/bench_scale.py                         # 32 blocks, wanda; sparsefw on 2 blocks
    python benchmarks/bench_scale.py --smollm2 --before a93fd30   # SmolLM2 wanda, now and at a commit
    python benchmarks/bench_scale.py --tiny --out /tmp/scale  # seconds: what the test suite runs

Results: ``results/scale.json`` and ``results/scale.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAPES = {  # LLaMA-2-7B, and a tiny stand-in for the tests
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4),
}

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from fw_jax.cli import main
code = main(sys.argv[2:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
      file=open(sys.argv[1], "w"))
sys.exit(code)
"""


def _tokenizer():
    from fw_jax.models._gguf import gguf_tokenizer
    from fw_jax.models._loading import smollm2_gguf_path

    return gguf_tokenizer(smollm2_gguf_path())


def make_checkpoint(folder: pathlib.Path, shape: str, blocks: int, seed: int = 0) -> pathlib.Path:
    """A random LLaMA checkpoint of ``shape`` with ``blocks`` blocks in bfloat16 (kept if present)."""
    import ml_dtypes
    import transformers

    from fw_jax.models._safetensors import write_safetensors

    spec = {"shape": shape, "blocks": blocks, "seed": seed, "version": 1}
    marker = folder / "bench_scale.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = _tokenizer()
    dims = SHAPES[shape]
    config = transformers.LlamaConfig(vocab_size=len(tok), num_hidden_layers=blocks, max_position_embeddings=4096,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      architectures=["LlamaForCausalLM"], **dims)
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    rng = np.random.default_rng(seed)
    d, f, v = dims["hidden_size"], dims["intermediate_size"], len(tok)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def normal(shape):
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    def ones(shape):
        return lambda: np.ones(shape, bf16)

    def block(b):
        p = f"model.layers.{b}."
        return [(p + "input_layernorm.weight", (d,), bf16, ones((d,))),
                *[(p + f"self_attn.{n}_proj.weight", (d, d), bf16, normal((d, d))) for n in "qkvo"],
                (p + "post_attention_layernorm.weight", (d,), bf16, ones((d,))),
                (p + "mlp.gate_proj.weight", (f, d), bf16, normal((f, d))),
                (p + "mlp.up_proj.weight", (f, d), bf16, normal((f, d))),
                (p + "mlp.down_proj.weight", (d, f), bf16, normal((d, f)))]

    # Shards as a checkpoint on the Hub has them: several blocks each, the embeddings in the first.
    per_shard = 4
    groups = [[("model.embed_tokens.weight", (v, d), bf16, normal((v, d)))]]
    for start in range(0, blocks, per_shard):
        groups.append([t for b in range(start, min(blocks, start + per_shard)) for t in block(b)])
    groups[-1] += [("model.norm.weight", (d,), bf16, ones((d,))), ("lm_head.weight", (v, d), bf16, normal((v, d)))]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, group, {"format": "pt"}, progress=False)
        for tensor, shape_, dtype, _ in group:
            weight_map[tensor] = name
            total += int(np.prod(shape_)) * dtype.itemsize
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    marker.write_text(json.dumps(spec))
    return folder


def _folder_size(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _dtypes(folder: pathlib.Path) -> list[str]:
    from fw_jax.models._safetensors import SafetensorsFile

    return sorted({SafetensorsFile(p).dtype(n).name for p in folder.glob("*.safetensors")
                   for n in SafetensorsFile(p).keys()})


def run_prune(model: str, out: pathlib.Path, method: str, args: list[str], pythonpath: str | None = None) -> dict:
    """``fw-jax prune`` in a child process; its wall time, peak RSS and what it wrote."""
    if out.exists():
        shutil.rmtree(out)
    stats = out.parent / f"{out.name}.stats.json"
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    argv = ["prune", model, "--out", str(out), "--method", method, *args]
    started = time.perf_counter()
    # In the other tree's folder: python -c puts the working folder first on sys.path.
    done = subprocess.run([sys.executable, "-c", CHILD, str(stats), *argv], env=env, capture_output=True, text=True,
                          cwd=pythonpath)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fw-jax {' '.join(argv)} failed:\n{done.stderr[-4000:]}")
    child = json.loads(stats.read_text())
    report = json.loads((out / "prune_report.json").read_text())
    blocks = len({r["block"] for r in report["layers"]})
    version = subprocess.run([sys.executable, "-c", "import fw_jax, os; print(os.path.dirname(fw_jax.__file__))"],
                             env=env, capture_output=True, text=True, cwd=pythonpath).stdout.strip()
    row = {"method": method, "fw_jax_imported_from": version, "command": "fw-jax " + " ".join(argv), "blocks": blocks,
           "wall_seconds": wall, "prune_seconds": report["seconds"], "seconds_per_block": report["seconds"] / blocks,
           "peak_rss_gb": child["peak_rss_gb"], "output_gb": _folder_size(out) / 1e9, "output_dtypes": _dtypes(out),
           "mean_error_vs_wanda": report["summary"]["mean_error_vs_wanda"]}
    shutil.rmtree(out)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "scale"), help="where checkpoints and outputs go")
    p.add_argument("--tiny", action="store_true", help="a tiny model (seconds), for the tests")
    p.add_argument("--blocks", type=int, default=32, help="blocks of the wanda checkpoint")
    p.add_argument("--sparsefw-blocks", type=int, default=2, help="blocks of the checkpoint sparsefw prunes")
    p.add_argument("--sparsefw-iter", type=int, default=5, help="sparsefw --max-iter (a few: this is a CPU)")
    p.add_argument("--methods", nargs="+", choices=("wanda", "sparsefw"), default=("wanda", "sparsefw"),
                   help="which runs (the saved rows of the others are kept)")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--smollm2", action="store_true", help="instead: SmolLM2-135M wanda, whole model")
    p.add_argument("--before", default=None, metavar="COMMIT", help="--smollm2: also at this commit (a worktree)")
    p.add_argument("--results", default=str(ROOT / "results" / "scale.json"), help="JSON results (and .md beside it)")
    args = p.parse_args(argv)
    work = pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", "pydoc-calib", "-q"]
    rows = []
    if args.smollm2:
        versions = [("this change", None)]
        if args.before:
            tree = work / f"worktree-{args.before}"
            if not tree.exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True)
            versions.append((f"before ({args.before})", str(tree)))
        for label, path in versions:
            row = run_prune("smollm2-135m", work / "smollm2-wanda", "wanda", common, pythonpath=path)
            rows.append({"model": "SmolLM2-135M (Q4_1 GGUF)", "version": label, **row})
            print(json.dumps(rows[-1]), flush=True)
    else:
        shape = "tiny" if args.tiny else "7b"
        for method, blocks, extra in (("wanda", args.blocks, []),
                                      ("sparsefw", args.sparsefw_blocks, ["--max-iter", str(args.sparsefw_iter)])):
            if method not in args.methods:
                continue
            folder = make_checkpoint(work / f"{shape}-{blocks}blocks", shape, blocks)
            commit = _commit()  # the code the child imports: read before it starts, not after
            row = run_prune(str(folder), work / f"{shape}-{blocks}-{method}", method, common + extra)
            rows.append({"model": f"LLaMA-2-7B-shaped bf16, {blocks} blocks" if shape == "7b" else f"tiny, {blocks} blocks",
                         "input_gb": _folder_size(folder) / 1e9, "input_dtypes": _dtypes(folder),
                         "date": time.strftime("%Y-%m-%d"), "commit": commit, **row})
            print(json.dumps(rows[-1]), flush=True)
    results = pathlib.Path(args.results)
    existing = json.loads(results.read_text()) if results.exists() else {}
    key = "smollm2" if args.smollm2 else ("tiny" if args.tiny else "7b")
    if not args.smollm2 and key in existing:  # rows of the methods not run this time stay
        rows = [r for r in existing[key]["rows"] if r["method"] not in args.methods] + rows
        rows.sort(key=lambda r: ("wanda", "sparsefw").index(r["method"]) if r["method"] in ("wanda", "sparsefw") else 9)
    existing[key] = {"rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_scale.py " + " ".join(argv or sys.argv[1:])}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(existing, indent=1))
    _write_markdown(existing, results.with_suffix(".md"))
    return 0


def _commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


HEADER = ("# Scale: pruning out of core, in the checkpoint's dtype\n\n"
          "Written by `benchmarks/bench_scale.py` (the runs), `benchmarks/profile_block.py` (the per-phase profile) "
          "and `benchmarks/bench_rounding.py` (the per-row selections); every number below was measured by them.\n")


def _write_markdown(results: dict, path: pathlib.Path) -> None:
    """This benchmark's sections of ``path``, each replaced in place or appended; other sections
    (``profile_block.py``'s) are kept."""
    text = path.read_text() if path.exists() else HEADER
    for key, title in (("7b", "LLaMA-2-7B-shaped bfloat16 checkpoint"), ("smollm2", "SmolLM2-135M"),
                       ("tiny", "tiny (the test suite's run)")):
        if key not in results:
            continue
        block = results[key]
        lines = [f"## {title}", "", f"`{block['command']}` on {block['machine']}, {block['date']} (the last run; each "
                 "row's own date and fw_jax commit are under 'version': `--methods` reruns some rows only).", "",
                 "| model | version | method | blocks | wall (s) | s/block | peak RSS (GB) | input (GB) | output (GB) | output dtypes |",
                 "|:--|:--|:--|--:|--:|--:|--:|--:|--:|:--|"]
        for r in block["rows"]:
            version = r.get("version") or (f"{r['date']}, {r['commit']}" if "commit" in r else "")
            lines.append(f"| {r['model']} | {version} | {r['method']} | {r['blocks']} | {r['wall_seconds']:.0f} | "
                         f"{r['seconds_per_block']:.1f} | {r['peak_rss_gb']:.2f} | "
                         f"{format(r['input_gb'], '.2f') if 'input_gb' in r else '-'} | "
                         f"{r['output_gb']:.2f} | {', '.join(r['output_dtypes'])} |")
        text = with_section(text, f"## {title}", "\n".join(lines) + "\n")
    path.write_text(text)


def head_commit() -> str:
    """The checkout's commit, short (read before a benchmark runs: the code it measures)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def run_fields(script: str, argv: list[str], commit: str) -> dict:
    """What every section names its run by: command, date, machine, commit, jax, load average."""
    import jax

    return dict(command=shlex.join(["python", f"benchmarks/{script}", *argv]), date=time.strftime("%Y-%m-%d"),
                machine=f"{platform.machine()}, {os.cpu_count()} cores", commit=commit, jax=jax.__version__,
                load_average=os.getloadavg()[1])


def save_section(results: pathlib.Path, key: str, result: dict, title: str, section: str) -> None:
    """``result`` under ``key`` of the JSON ``results`` (its other keys kept), and ``section`` under
    ``title`` of the markdown beside it (its other sections kept)."""
    from fw_jax.pipeline import atomic_write

    existing = json.loads(results.read_text()) if results.exists() else {}
    existing[key] = result
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(results, json.dumps(existing, indent=1))
    markdown = results.with_suffix(".md")
    text = markdown.read_text() if markdown.exists() else ""
    atomic_write(markdown, with_section(text, title, section))


def with_section(text: str, title: str, section: str) -> str:
    """``text`` with the section headed ``title`` replaced by ``section`` (appended if absent)."""
    lines = text.split("\n")
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before, rest = "\n".join(lines[:start]), "\n".join(lines[end:])
        return (before + "\n" if start else "") + section + ("\n" + rest if rest else "")
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section


if __name__ == "__main__":
    sys.exit(main())
