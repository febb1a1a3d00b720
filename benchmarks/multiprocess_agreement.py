"""How far a run of several processes is from one process's: Gram matrices, masks, layer errors and
perplexity, block by block, on a tiny random LLaMA that a CPU prunes in minutes.

    python benchmarks/multiprocess_agreement.py                   # the code here
    python benchmarks/multiprocess_agreement.py --before e02e3b1  # and at a commit (its fw_jax, exported)

Runs ``fw-jax prune`` (sparsefw) once in one process and once in two (``--coordinator`` on
localhost), each saving every layer's Gram matrix as the pipeline hands it to the method, then
compares the two runs block by block: Gram entries that differ (and by how much), mask entries
that differ per matrix, layer errors, and the perplexity of the two pruned models. The model is
the first ``--blocks`` blocks of the built-in SmolLM2-135M (its own weights, so its activations'
outliers and near-ties are real ones), or with ``--model tiny`` ``bench_scale.py``'s tiny random
LLaMA (hidden 64, MLP 160, bfloat16). Writes ``results/multiprocess.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# The CLI, with every Gram matrix the pipeline hands to a method saved as GRAM_DUMP/<layer>.npy.
CHILD = """
import os, sys
import numpy as np
from fw_jax.pipeline import prune
named = prune._prune_named
def _prune_named(name, weight, gram, *args, **kwargs):
    np.save(os.path.join(os.environ["GRAM_DUMP"], name + ".npy"), np.asarray(gram, np.float32))
    return named(name, weight, gram, *args, **kwargs)
prune._prune_named = _prune_named
from fw_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def smollm2_blocks(folder: pathlib.Path, blocks: int) -> pathlib.Path:
    """The first ``blocks`` blocks of SmolLM2-135M (with its embeddings, final norm and head) as a
    Hugging Face folder (kept if present): fw_jax's own export, with the later blocks' shards left out."""
    from fw_jax import models

    spec = {"model": "smollm2-135m", "blocks": blocks, "version": 1}
    marker = folder / "multiprocess_agreement.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    full = folder.parent / "smollm2-full"
    if not (full / "config.json").exists():
        shutil.rmtree(full, ignore_errors=True)
        models.save_hf_folder(models.load_model(models.SMOLLM2_NAME), full)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {name: shard for name, shard in index["weight_map"].items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < blocks}
    folder.mkdir(parents=True)
    for path in full.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy(path, folder / path.name)
    for shard in sorted(set(keep.values())):
        shutil.copy(full / shard, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    marker.write_text(json.dumps(spec))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _export(commit: str, work: pathlib.Path) -> pathlib.Path:
    """``fw_jax`` as it was at ``commit``, in a folder of its own (read from git, nothing checked out)."""
    tree = work / f"fw_jax-{commit}"
    if not tree.exists():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "fw_jax"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree)
    return tree


def _prune(model, out: pathlib.Path, args, processes: int, pythonpath: str | None) -> float:
    for path in (out, pathlib.Path(str(out) + ".partial"), pathlib.Path(str(out) + ".grams")):
        shutil.rmtree(path, ignore_errors=True)
    dump = pathlib.Path(str(out) + ".grams")
    dump.mkdir(parents=True)
    env = dict(os.environ, GRAM_DUMP=str(dump), JAX_PLATFORMS="cpu")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = ["prune", str(model), "--out", str(out), *args, "-q"]
    port = _free_port()
    many = [] if processes == 1 else ["--coordinator", f"localhost:{port}", "--num-processes", str(processes)]
    started = time.perf_counter()
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, *command, *many, *(["--process-id", str(i)] if many else [])],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=pythonpath)
            for i in range(processes)]
    for run in runs:
        _, err = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"fw-jax {' '.join(command)} ({processes} processes) failed:\n{err[-4000:]}")
    return time.perf_counter() - started


def _tensors(folder: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(path).items()})
    return out


def _perplexities(one: pathlib.Path, many: pathlib.Path) -> dict:
    from fw_jax.pipeline import evaluate_perplexity, load_documents

    return evaluate_perplexity({"one": str(one), "many": str(many)}, load_documents("pydoc-eval", split="evaluation"),
                               seqlen=128, max_windows=16, progress=False)


def compare(one: pathlib.Path, many: pathlib.Path, blocks: int) -> list[dict]:
    """Per block: Gram entries differing, mask entries differing per matrix, layer errors."""
    a, b = _tensors(one), _tensors(many)
    ra, rb = (json.loads((o / "prune_report.json").read_text())["layers"] for o in (one, many))
    errors = {r["name"]: r["error"] for r in ra}, {r["name"]: r["error"] for r in rb}
    rows = []
    for block in range(blocks):
        layers = [r["name"] for r in ra if r["block"] == block]
        grams = []
        for name in layers:
            ga = np.load(pathlib.Path(str(one) + ".grams") / f"{name}.npy")
            gb = np.load(pathlib.Path(str(many) + ".grams") / f"{name}.npy")
            grams.append((int((ga != gb).sum()), ga.size, float(np.abs(ga - gb).max() / np.abs(ga).max())))
        masks = [int(((a[n + ".weight"] != 0) != (b[n + ".weight"] != 0)).sum()) for n in layers]
        sizes = [a[n + ".weight"].size for n in layers]
        error_change = [abs(errors[1][n] / errors[0][n] - 1) if errors[0][n] else 0.0 for n in layers]
        rows.append({"block": block, "gram_entries_differing": sum(g[0] for g in grams),
                     "gram_entries": sum(g[1] for g in grams), "gram_max_relative_difference": max(g[2] for g in grams),
                     "mask_entries_differing_mean_per_matrix": float(np.mean(masks)),
                     "mask_entries_differing_max_per_matrix": int(max(masks)), "matrix_entries_mean": float(np.mean(sizes)),
                     "layer_error_max_relative_difference": float(max(error_change))})
    return rows


def measure(model, work: pathlib.Path, args, blocks: int, label: str, pythonpath: str | None) -> dict:
    one, many = work / f"{label}-one", work / f"{label}-two"
    seconds = {"one": _prune(model, one, args, 1, pythonpath), "two": _prune(model, many, args, 2, pythonpath)}
    identical = all(np.array_equal(x, _tensors(many)[k]) for k, x in _tensors(one).items())
    return {"version": label, "blocks": compare(one, many, blocks), "perplexity": _perplexities(one, many),
            "all_tensors_identical": identical, "wall_seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--before", default=None, metavar="COMMIT", help="also measure fw_jax as it was at this commit")
    p.add_argument("--work", default=str(ROOT / "runs" / "multiprocess"), help="models, outputs, Gram matrices")
    p.add_argument("--results", default=str(ROOT / "results" / "multiprocess.json"))
    args = p.parse_args(argv)
    from bench_scale import make_checkpoint

    work = pathlib.Path(args.work)
    if args.model == "tiny":
        model = make_checkpoint(work / "model", "tiny", args.blocks)
        described = f"tiny random LLaMA (hidden 64, MLP 160, bfloat16), {args.blocks} blocks"
    else:
        model = smollm2_blocks(work / f"smollm2-{args.blocks}-blocks", args.blocks)
        described = f"the first {args.blocks} blocks of SmolLM2-135M (bfloat16)"
    prune_args = ["--calib", "pydoc-calib", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                  "--method", "sparsefw", "--max-iter", "20"]
    versions = [measure(model, work, prune_args, args.blocks, "now", None)]
    if args.before:
        versions.insert(0, measure(model, work, prune_args, args.blocks, f"before ({args.before})",
                                   str(_export(args.before, work))))
    record = {"versions": versions, "prune": "fw-jax prune MODEL " + " ".join(prune_args),
              "model": described,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/multiprocess_agreement.py " + " ".join(argv or sys.argv[1:])}
    results = pathlib.Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=1))
    _write_markdown(record, results.with_suffix(".md"))
    print(results.with_suffix(".md").read_text())
    return 0


def _write_markdown(record: dict, path: pathlib.Path) -> None:
    lines = ["# One process or two: how far apart the pruned models are", "",
             "Written by `benchmarks/multiprocess_agreement.py` (see its docstring); every number below was "
             "measured by it.", "",
             f"`{record['command']}` on {record['machine']}, {record['date']}: {record['model']}, "
             f"`{record['prune']}`, in one process and in two (`--coordinator localhost:PORT`).", "",
             "Gram matrices are compared as the pipeline hands them to the method; masks as the nonzero entries "
             "of the written weights. A model cut to its first blocks, followed by the head, has a meaningless "
             "perplexity of its own: only the difference between the two runs counts.", ""]
    for version in record["versions"]:
        ppl = version["perplexity"]
        lines += [f"## {version['version']}", "",
                  f"All tensors identical: **{'yes' if version['all_tensors_identical'] else 'no'}**. Perplexity "
                  f"(pydoc-eval, 16 windows of 128 tokens): one process {ppl['one']:.4f}, two {ppl['many']:.4f} "
                  f"(difference {ppl['many'] - ppl['one']:+.4f}).", "",
                  "| block | Gram entries differing | max relative Gram difference | mask entries differing per "
                  "matrix, mean (max) | entries per matrix | max relative layer-error difference |",
                  "|--:|--:|--:|--:|--:|--:|"]
        for r in version["blocks"]:
            lines.append(f"| {r['block']} | {r['gram_entries_differing']} of {r['gram_entries']} | "
                         f"{r['gram_max_relative_difference']:.2g} | {r['mask_entries_differing_mean_per_matrix']:.1f} "
                         f"({r['mask_entries_differing_max_per_matrix']}) | {r['matrix_entries_mean']:.0f} | "
                         f"{r['layer_error_max_relative_difference']:.2g} |")
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
