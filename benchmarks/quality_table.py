"""Perplexity of a small model pruned by every method (issues 4 and 5: the quality table).

The model is ``--model``: SmolLM2-135M (the default; results/quality.md) or Gemma 3 270M
(``gemma3-270m``; results/quality-gemma3.md), each with its own results file and pruned folders.

Calibration: random windows of five Austen novels (Persuasion held out), SparseGPT/Wanda
protocol. Evaluation: held-out Persuasion and CPython's `pydoc_data` evaluation part, docs/design.md §16
protocol (first ``--max-windows`` windows). Every pruned model is a folder under ``--runs``;
finished ones are reused, so the script can be interrupted and re-run. With ``--tasks``, every
row also gets zero-shot accuracy (``acc %`` and its standard error ``±``, in points) on those
tasks (``fw_jax.pipeline.tasks``); a row whose folder is gone is pruned again (float32 output, as
the perplexity rows were written), its perplexity kept.

    python benchmarks/quality_table.py --settings 50% 2:4 60%
    python benchmarks/quality_table.py --model gemma3-270m --settings 50% --methods wanda
    python benchmarks/quality_table.py --settings 50% --methods wanda \
        --tasks builtin:persuasion-next-sentence builtin:persuasion-cloze
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import re
import resource
import shlex
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"

from fw_jax.pipeline import (  # noqa: E402
    Allocation, PruneSettings, RecoverSettings, atomic_write, evaluate_perplexity, format_table, load_documents, prune_to_folder,
)
from fw_jax.pipeline.tasks import evaluate_tasks, load_task  # noqa: E402
from fw_jax.solver import SolverOptions  # noqa: E402
from real_layers import calibration_books  # noqa: E402

METHODS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "ria": dict(method="ria"),
    "sparsegpt": dict(method="sparsegpt"),
    "sparsefw published": dict(method="sparsefw-published"),
    "sparsefw α=0.9": dict(method="sparsefw", alpha=0.9, shrinkage=0.0),
    "sparsefw α=0": dict(method="sparsefw", alpha=0.0, shrinkage=0.0),
    "wanda + reconstruct": dict(method="wanda", reconstruct=True),
    "sparsefw α=0 + reconstruct": dict(method="sparsefw", alpha=0.0, shrinkage=0.0, reconstruct=True),
    "sparsefw α=0.9 + reconstruct": dict(method="sparsefw", alpha=0.9, shrinkage=0.0, reconstruct=True),
    "sparsegpt mask + reconstruct": dict(method="sparsegpt", reconstruct=True),
    "ria + reconstruct": dict(method="ria", reconstruct=True),
    "magnitude + reconstruct": dict(method="magnitude", reconstruct=True),
    "sparsefw published + reconstruct": dict(method="sparsefw-published", reconstruct=True),
    "sparsefw α=0.9 ρ=0.5": dict(method="sparsefw", alpha=0.9, shrinkage=0.5),
    "sparsefw α=0 ρ=0.5": dict(method="sparsefw", alpha=0.0, shrinkage=0.5),
    # the Frank-Wolfe loop's products in bfloat16 (float32 sums): a candidate default
    "sparsefw α=0.9 ρ=0.5 (bf16 products)": dict(method="sparsefw", alpha=0.9, shrinkage=0.5,
                                                 options=SolverOptions(precision="bfloat16")),
    "sparsefw α=0.9 ρ=0.5 + reconstruct": dict(method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True),
    # issue 20: block-wise recovery (RecoverSettings' defaults) and OWL's allocation
    "sparsefw α=0.9 ρ=0.5 + reconstruct + recover": dict(method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True,
                                                         recover=RecoverSettings()),
    "sparsefw α=0.9 ρ=0.5 + reconstruct + recover (token loss)": dict(
        method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True, recover=RecoverSettings(loss="token")),
    "sparsefw α=0.9 ρ=0.5 + reconstruct + recover (lr 3e-4)": dict(  # Gemma: results/recover_gemma3.md
        method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True, recover=RecoverSettings(learning_rate=3e-4)),
    "sparsefw α=0.9 ρ=0.5 + reconstruct + recover (100 steps)": dict(
        method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True, recover=RecoverSettings(steps=100)),
    "sparsefw α=0.9 ρ=0.75 + reconstruct + recover": dict(method="sparsefw", alpha=0.9, shrinkage=0.75, reconstruct=True,
                                                          recover=RecoverSettings()),
    "sparsegpt + recover": dict(method="sparsegpt", recover=RecoverSettings()),
    "wanda + recover": dict(method="wanda", recover=RecoverSettings()),  # ρ = 1's limit of fw_jax's recovery row
    "wanda + owl": dict(method="wanda", allocation=Allocation("owl")),
    "sparsegpt + owl": dict(method="sparsegpt", allocation=Allocation("owl")),
    "sparsefw α=0.9 ρ=0.5 + reconstruct + owl": dict(method="sparsefw", alpha=0.9, shrinkage=0.5, reconstruct=True,
                                                     allocation=Allocation("owl")),
}
# The models the table is made for: the title its results file names it by, and where it goes.
MODELS = {
    "smollm2-135m": dict(title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", out="quality", runs="quality",
                         short="SmolLM2-135M"),
    "gemma3-270m": dict(title="Gemma 3 270M (Q4_K_M GGUF, dequantized)", out="quality-gemma3",
                        runs="quality-gemma3", short="Gemma 3 270M"),
}
DEFAULT_MODEL = "smollm2-135m"
SETTINGS = {"50%": dict(sparsity=0.5), "60%": dict(sparsity=0.6), "70%": dict(sparsity=0.7), "2:4": dict(pattern=(2, 4))}
RECOVERED = "sparsefw α=0.9 ρ=0.5 + reconstruct + recover"  # issue 20's bar is on this row
PERPLEXITIES = ("Persuasion ppl", "pydoc-eval ppl")  # the columns every bar compares
NSAMPLES = 32  # calibration windows of an unmarked row (of 512 tokens: ``fw-jax prune``'s default)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                        help="the model pruned and evaluated (Gemma is given BOS at the start of every window)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--nsamples", type=int, default=NSAMPLES,
                        help=f"calibration windows; rows with another number than {NSAMPLES} are marked with it")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                        help="also zero-shot accuracy on these tasks (builtin:NAME or .jsonl), per row")
    parser.add_argument("--task-size", type=int, default=200, help="items of each builtin task")
    parser.add_argument("--runs", default=None,
                        help="folder of the pruned models (default: runs/quality for SmolLM2, runs/quality-gemma3 "
                             "for Gemma 3)")
    parser.add_argument("--out", default=None,
                        help="results file, without suffix (.json and .md are written; default: results/quality for "
                             "SmolLM2, results/quality-gemma3 for Gemma 3)")
    parser.add_argument("--readme", default="",
                        help="a Markdown file whose quality section (between the quality:start/end markers) is "
                             "rewritten after every row; none by default (README.md holds a short table by hand)")
    parser.add_argument("--side-by-side", action="store_true",
                        help=f"only rewrite {SIDE_BY_SIDE.relative_to(ROOT)} (both models, one table per setting) "
                             "from the results' JSON files; run nothing")
    parser.add_argument("--rewrite-only", action="store_true",
                        help="only rewrite --out's markdown and the README section from --out's JSON; run nothing")
    args = parser.parse_args()
    if args.side_by_side:
        write_side_by_side()
        return
    args.runs = args.runs or str(ROOT / "runs" / MODELS[args.model]["runs"])
    args.out = args.out or str(ROOT / "results" / MODELS[args.model]["out"])
    if args.readme and args.model != DEFAULT_MODEL:
        parser.error("--readme rewrites the README's SmolLM2 table; leave it out with --model " + args.model)
    check_model_of(pathlib.Path(args.out), args.model)
    if args.rewrite_only:
        write(pathlib.Path(args.out), *read_results(pathlib.Path(args.out)), args)
        return
    command = "python benchmarks/quality_table.py " + shlex.join(sys.argv[1:])  # quoted: it can be pasted as is
    started = time.perf_counter()
    calib = calibration_books()
    datasets = {
        "Persuasion": load_documents(str(CORPORA / "austen_persuasion.txt")),
        "pydoc-eval": load_documents("pydoc-eval"),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table, _ = read_results(out)  # rows of earlier (interrupted) runs are not run again
    produced: dict[str, dict] = {}  # the rows this invocation writes
    this_run = {"command": command, "seconds": 0.0, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    tasks = [load_task(spec, size=args.task_size) for spec in args.tasks]

    def perplexity(label, folder) -> dict:  # {dataset: ppl}
        return {dataset: evaluate_perplexity({label: folder}, documents, seqlen=args.eval_seqlen,
                                             max_windows=args.max_windows)[label]
                for dataset, documents in datasets.items()}

    def evaluate(label, folder):
        if label not in table:
            table[label] = {f"{dataset} ppl": value for dataset, value in perplexity(label, folder).items()}
        todo = [t for t in tasks if not _has_accuracy(table[label], t)]
        for task, result in (evaluate_tasks({label: folder}, todo)[label].items() if todo else ()):
            table[label][f"{task} acc %"] = 100 * result.acc
            table[label][f"{task} ±"] = 100 * result.acc_stderr
            if result.acc_norm is not None:  # multiple choice: lm-eval's length-normalised accuracy too
                table[label][f"{task} acc_norm %"] = 100 * result.acc_norm
                table[label][f"{task} acc_norm ±"] = 100 * result.acc_norm_stderr
        produced[label] = table[label]

    def has_accuracy(label):
        return label in table and all(_has_accuracy(table[label], t) for t in tasks)

    evaluate("dense", args.model)
    table["dense"].setdefault("peak RSS GB", peak_rss_gb())
    this_run["seconds"] = time.perf_counter() - started
    write(out, *merge_rows(out, produced, this_run), args)
    for setting in args.settings:
        for name in args.methods:
            tag = calibration_tag(args.seed, args.nsamples)
            label = f"{name} @ {setting}{tag}"
            folder = pathlib.Path(args.runs) / slug(f"{setting}-{name}{tag}")
            report_path = folder / "prune_report.json"
            if label in table and has_accuracy(label):
                continue
            if not report_path.exists():
                settings = PruneSettings.from_options(**METHODS[name], **SETTINGS[setting])
                prune_to_folder(args.model, str(folder), settings, calib=calib, nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, history_layer=None, dtype="float32")
            rerun = label in table  # pruned again for its accuracy: its perplexity row stands
            evaluate(label, str(folder))
            report = json.loads(report_path.read_text())
            if rerun:  # is it the row's model? Say so in the results, where the accuracy is read
                measured = None if reproduces(table[label], report) else perplexity(label, str(folder))  # how far off
                note = reproduction_note(label, table[label], report, measured)
                print(note, flush=True)
                this_run.setdefault("re-pruned", []).append(note)
            else:
                table[label]["mean layer error vs Wanda"] = report["summary"]["mean_error_vs_wanda"]
                table[label]["prune s"] = report["seconds"]
                table[label]["peak RSS GB"] = peak_rss_gb()
            produced[label] = table[label]
            this_run["seconds"] = time.perf_counter() - started
            write(out, *merge_rows(out, produced, this_run), args)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def check_model_of(out: pathlib.Path, model: str) -> None:
    """Refuse to add ``model``'s rows to a results file written for another model.

    A file written before ``--model`` existed names no model: it is SmolLM2's.
    """
    path = out.with_suffix(".json")
    if not path.exists():
        return
    try:
        there = json.loads(path.read_text()).get("model", DEFAULT_MODEL)
    except (ValueError, AttributeError) as e:
        raise SystemExit(f"{path} is not a quality-table results file (a JSON object with 'commands' and "
                         f"'table'): {e}")
    if there != model:
        raise SystemExit(f"{path} holds {there}'s rows, not {model}'s: give --out (and --runs) another name, "
                         f"or leave them out for {model}'s own (results/{MODELS[model]['out']})")


def reproduces(row: dict, report: dict) -> bool:
    """Whether a model pruned again has the row's mean layer error (to 1e-6 relative).

    The pruning is deterministic on one machine, so the same code gives the same error to the last
    digits there; another machine's floating point can move it slightly (and the model with it).
    """
    before = row.get("mean layer error vs Wanda")
    return before is not None and abs(report["summary"]["mean_error_vs_wanda"] - before) <= 1e-6 * abs(before)


def reproduction_note(label: str, row: dict, report: dict, perplexity: dict | None = None) -> str:
    """What the results say of the model pruned again for ``label``'s accuracy: whether it is the
    row's (by mean layer error) and, if not and ``perplexity`` (``{dataset: ppl}``) is given, how
    its perplexity compares with the row's."""
    now = report["summary"]["mean_error_vs_wanda"]
    before = row.get("mean layer error vs Wanda")
    if before is None:
        return f"{label} re-pruned: mean layer error {now:.7f} (the row has none to compare)"
    if reproduces(row, report):
        return f"{label} re-pruned: mean layer error {now:.7f}, as in the row"
    note = (f"{label} re-pruned: mean layer error {now:.7f}, not the row's {before:.7f}: its accuracy "
            "comes from a different model than its perplexity")
    if perplexity:
        note += (" (this one's perplexity: " + " / ".join(f"{v:.2f}" for v in perplexity.values()) + ", the row's "
                 + " / ".join(f"{row[f'{d} ppl']:.2f}" for d in perplexity) + f", {' / '.join(perplexity)})")
    return note


def _has_accuracy(row: dict, task) -> bool:
    return f"{task.name} acc %" in row and (task.kind != "choice" or f"{task.name} acc_norm %" in row)


def read_results(out: pathlib.Path) -> tuple[dict, list]:
    """The table and the list of invocations (each with its wall time) in ``out``'s JSON."""
    if not out.with_suffix(".json").exists():
        return {}, []
    previous = json.loads(out.with_suffix(".json").read_text())
    commands = previous.get("commands") or [{"command": previous["command"], "seconds": previous["seconds"]}]
    return previous.get("table", {}), commands


def merge_rows(out: pathlib.Path, rows: dict, this_run: dict) -> tuple[dict, list]:
    """``out``'s results as they are on disk now, with ``rows`` and this invocation's entry added.

    Re-reading just before each write keeps the rows that another invocation wrote since this one
    started (two runs of different rows may share the file), and only this run's rows change.
    """
    table, commands = read_results(out)
    table.update(rows)
    commands = [c for c in commands if c.get("started") != this_run["started"] or c["command"] != this_run["command"]]
    return table, [*commands, dict(this_run)]


def write(out, table, commands, args):
    model = getattr(args, "model", DEFAULT_MODEL)
    record = {"commands": commands, "table": table}
    if model != DEFAULT_MODEL:  # SmolLM2's file predates the field; its absence means SmolLM2
        record = {"model": model, **record}
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=1))
    dated = model != DEFAULT_MODEL  # SmolLM2's earlier runs kept no start date in the file
    runs = [f"- `{c['command']}` — " + (f"started {c['started']}, " if dated and c.get("started") else "")
            + f"{c['seconds'] / 60:.0f} min" + "".join(f"; {n}" for n in c.get("re-pruned", ()))
            for c in commands if c["seconds"] > 0]
    layers = f"the {LAYERS[model]} pruned layers" if model in LAYERS else "the pruned layers"
    text = "\n".join([
        f"# Perplexity of pruned {MODELS[model]['title']}",
        "",
        *intro(out),
        f"Produced on {platform.machine()} ({jax.default_backend()}, {os.cpu_count()} cores), jax {jax.__version__}, "
        "by these runs (each re-run reuses the finished rows and pruned folders of the earlier ones):",
        "",
        *runs,
        "",
        f"Calibration: {NSAMPLES} windows × {args.seqlen} tokens from five Austen novels (Persuasion held out), "
        "seed 0, unless the row says otherwise (`(seed 1)`, `(128 windows)`: a seed's first 32 windows are the same "
        f"whatever the number drawn). Evaluation: first {args.max_windows} windows of {args.eval_seqlen} tokens of Persuasion "
        "and of the pydoc evaluation text. Mean layer error: the method's layer error ‖WX − ŴX‖² divided by "
        f"Wanda's on the same inputs, averaged over {layers} (with reconstruction: of its weights; with "
        "recovery: still of the weights before it, since recovery fits whole blocks to the dense model's outputs, not "
        "each layer to its own inputs). Prune s: wall time of the pruning alone. Peak RSS GB: the script's peak "
        "resident memory when the row was written (pruning and evaluation; an invocation that ran several rows "
        "shows its peak so far). "
        + ("BOS starts every calibration and evaluation window, as Gemma expects." if model == "gemma3-270m" else ""),
        "",
        format_table(table, digits=3),
        "",
        *pivot(table, model),
        *accuracy_pivot(table),
        *bars(table),
        *recovery_bars(table),
        *missing(table, model),
    ])
    atomic_write(out.with_suffix(".md"), text)
    if out.parent == SIDE_BY_SIDE.parent:  # the repository's results: keep the side-by-side page current
        write_side_by_side()
    if args.readme:
        update_readme(pathlib.Path(args.readme), table, commands)
    print(text, flush=True)


LAYERS = {"smollm2-135m": 210, "gemma3-270m": 126}  # 7 linear layers a block: 30 blocks, 18 blocks
INTRO_START, INTRO_END = "<!-- intro:start -->", "<!-- intro:end -->"


def intro(out: pathlib.Path) -> list[str]:
    """The hand-written paragraph at the top of ``out``'s markdown (between the intro markers), kept
    as it is when the file is rewritten; none if the file has no such section."""
    path = out.with_suffix(".md")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = text.find(INTRO_START), text.find(INTRO_END)
    return [text[start:end + len(INTRO_END)], ""] if 0 <= start < end else []


README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"


def readme_section(table, commands) -> str:
    """The README's quality section: the by-setting table and where it comes from."""
    minutes = sum(c["seconds"] for c in commands) / 60
    return "\n".join([
        README_START,
        "### Perplexity: the quality table",
        "",
        "SmolLM2-135M calibrated on 32×512 tokens of five Austen novels, evaluated on held-out",
        "*Persuasion* and on CPython's pydoc text (cells: Persuasion / pydoc perplexity, lower is",
        "better). Written by `python benchmarks/quality_table.py` into",
        "[`results/quality.md`](results/quality.md) (all rows, commands, times, per-seed bars, mean",
        f"layer error vs Wanda); {minutes:.0f} minutes of 2-core CPU in all.",
        "",
        *pivot(table)[2:],
        README_END,
    ])


def update_readme(path: pathlib.Path, table, commands) -> None:
    """Rewrite the section of ``path`` between the quality markers (which must be there)."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no {README_START} … {README_END} section to rewrite")
    atomic_write(path, text[:start] + readme_section(table, commands) + text[end + len(README_END):])


DEFAULT = "sparsefw α=0.9 ρ=0.5"  # fw_jax's pipeline default (PruneSettings)
RECONSTRUCTED = ("sparsefw α=0 + reconstruct", "sparsefw α=0.9 + reconstruct", "sparsefw α=0.9 ρ=0.5 + reconstruct")


def pivot(table, model=DEFAULT_MODEL):
    """The seed-0 rows as one line per method, ``Persuasion / pydoc`` perplexity per setting: the
    methods of ``model``'s grid (:data:`GRIDS`) and any other with a row."""
    names = ["dense"] + [n for n in METHODS if n in GRIDS[model] or any(f"{n} @ {s}" in table for s in SETTINGS)]
    lines = ["## By setting (Persuasion / pydoc-eval perplexity, seed 0)", "",
             "| method | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for name in names:
        cells = []
        for setting in SETTINGS:
            row = table.get("dense" if name == "dense" else f"{name} @ {setting}")
            cells.append(f"{row['Persuasion ppl']:.1f} / {row['pydoc-eval ppl']:.1f}" if row else "not run")
        label = f"**{name}** (fw_jax default)" if name == DEFAULT else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


SIDE_BY_SIDE = ROOT / "results" / "quality-models.md"


def side_by_side(tables: dict) -> str:
    """Both models' seed-0 perplexity, one table per setting (``tables``: model → its table): the
    methods of Gemma 3's grid, the rows the two models share."""
    names = ["dense", *GEMMA3_GRID]
    lines = ["# Both models side by side", "",
             "Perplexity on held-out *Persuasion* / pydoc (lower is better), seed 0, from "
             "[the SmolLM2-135M table](quality.md) and [the Gemma 3 270M table](quality-gemma3.md) (same protocol; "
             "each page has its commands, times and memory). Written by `python benchmarks/quality_table.py "
             "--side-by-side` from their JSON files; 'not run': not measured yet.", ""]
    for setting in SETTINGS:
        lines += [f"## {setting}", "", "| method | " + " | ".join(MODELS[m]["short"] for m in tables) + " |",
                  "|---|" + "---|" * len(tables)]
        for name in names:
            cells = []
            for table in tables.values():
                row = table.get("dense" if name == "dense" else f"{name} @ {setting}")
                cells.append(f"{row['Persuasion ppl']:.1f} / {row['pydoc-eval ppl']:.1f}" if row else "not run")
            label = f"**{name}** (fw_jax default)" if name == DEFAULT else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_side_by_side(path: pathlib.Path = SIDE_BY_SIDE) -> None:
    """Rewrite ``path`` from every model's JSON in ``results/`` (nothing if one is missing)."""
    files = {m: ROOT / "results" / f"{MODELS[m]['out']}.json" for m in MODELS}
    if all(f.exists() for f in files.values()):
        atomic_write(path, side_by_side({m: json.loads(f.read_text())["table"] for m, f in files.items()}))


def accuracy_pivot(table):
    """The rows with zero-shot accuracy: per task, ``acc ± standard error`` (points) per setting."""
    tasks = list(dict.fromkeys(k[:-len(" %")] for row in table.values() for k in row
                               if k.endswith((" acc %", " acc_norm %"))))
    if not tasks:
        return []
    lines = ["## Zero-shot accuracy (%, ± standard error; built-in proxy tasks, seed 0)", "",
             "Built here from held-out text (`fw_jax.pipeline.tasks`), not the published benchmarks; two rows "
             "differ beyond noise only when their gap is well over the two standard errors combined.", ""]
    for metric in tasks:  # "TASK acc" or "TASK acc_norm"
        error = f"{metric[:-len(' acc')]} ±" if metric.endswith(" acc") else f"{metric} ±"
        lines += [f"### {metric}", "", "| method | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
        names = ["dense"] + [n for n in METHODS if any(f"{metric} %" in table.get(f"{n} @ {s}", {}) for s in SETTINGS)]
        for name in names:
            cells = []
            for setting in SETTINGS:
                row = table.get("dense" if name == "dense" else f"{name} @ {setting}", {})
                cells.append(f"{row[f'{metric} %']:.1f} ± {row[error]:.1f}" if f"{metric} %" in row else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# The grid issues 4 and 5 ask for; rows of it not in the table are listed, with why.
REQUIRED = ("magnitude", "wanda", "ria", "sparsegpt", "sparsefw published", DEFAULT,
            "magnitude + reconstruct", "wanda + reconstruct", "ria + reconstruct", "sparsegpt mask + reconstruct",
            "sparsefw published + reconstruct", "sparsefw α=0.9 ρ=0.5 + reconstruct")
# Gemma 3 270M's: the baselines, fw_jax's default with reconstruction and recovery, SparseGPT's recovery.
GEMMA3_GRID = ("magnitude", "wanda", "ria", "sparsegpt", DEFAULT, f"{DEFAULT} + reconstruct", RECOVERED,
               "sparsegpt + recover")
GRIDS = {"smollm2-135m": REQUIRED, "gemma3-270m": GEMMA3_GRID}


def why_missing(name: str, table) -> str:
    """Why a required row has not run, from the times of the rows of the same recipe that have."""
    if not name.startswith("sparsefw published"):
        return ""
    done = [f"{setting} {table[f'sparsefw published @ {setting}']['prune s'] / 60:.0f} min" for setting in SETTINGS
            if "prune s" in table.get(f"sparsefw published @ {setting}", {})]
    measured = f" (measured: {', '.join(done)})" if done else ""
    return (f"2000 open-loop iterations with a dense GEMM each, for 210 layers: over an hour of pruning per row on "
            f"2 CPU cores{measured}; runs resume per block, so the same command finishes them, or runs them in "
            "minutes on a GPU")


def missing(table, model=DEFAULT_MODEL):
    """The rows of ``model``'s grid (:data:`GRIDS`) not in ``table``: one line per method, with its
    settings and, where known, the reason."""
    lines = []
    for name in GRIDS[model]:
        absent = [setting for setting in SETTINGS if f"{name} @ {setting}" not in table]
        if absent:
            why = why_missing(name, table)
            lines.append(f"- {name} @ {', '.join(absent)}" + (f": {why}" if why else ""))
    return (["## Rows not run yet", "", *lines, ""]) if lines else []


def bars(table):
    """Issue 5's bars, checked on the rows present: default mask-only vs Wanda and RIA, and
    fw_jax with reconstruction vs SparseGPT, per setting and evaluation text."""
    lines = ["## Bars (computed from the rows above)", ""]
    for setting in SETTINGS:
        for tag in calibration_tags(table):  # one comparison per calibration
            ours = table.get(f"{DEFAULT} @ {setting}{tag}")
            for rival in ("wanda", "ria"):
                theirs = table.get(f"{rival} @ {setting}{tag}")
                if ours and theirs:
                    lines.append(f"- {setting}{tag}, {DEFAULT} vs {rival}: " + _compare(ours, theirs))
            sgpt = table.get(f"sparsegpt @ {setting}{tag}")
            for name in RECONSTRUCTED:
                if sgpt and f"{name} @ {setting}{tag}" in table:
                    lines.append(f"- {setting}{tag}, {name} vs sparsegpt: "
                                 + _compare(table[f"{name} @ {setting}{tag}"], sgpt))
    return lines + [""]


def calibration_tag(seed: int, nsamples: int) -> str:
    """A row's label suffix for its calibration: ``""`` for seed 0 and :data:`NSAMPLES` windows,
    else e.g. ``" (seed 1)"``, ``" (128 windows)"`` or ``" (seed 2, 128 windows)"``."""
    parts = ([f"seed {seed}"] if seed else []) + ([f"{nsamples} windows"] if nsamples != NSAMPLES else [])
    return f" ({', '.join(parts)})" if parts else ""


_TAG = re.compile(r" @ [^ ]+ \((?:seed (\d+))?(?:, )?(?:(\d+) windows)?\)$")


def calibrations(table) -> list[tuple[int, int]]:
    """``(windows, seed)`` of each calibration with rows, sorted: ``(NSAMPLES, 0)`` (unmarked) first."""
    found = {(NSAMPLES, 0)}
    for label in table:
        match = _TAG.search(label)
        if match and any(match.groups()):
            found.add((int(match[2] or NSAMPLES), int(match[1] or 0)))
    return sorted(found)


def calibration_tags(table) -> list[str]:
    """The label suffix of each calibration with rows, in :func:`calibrations`' order."""
    return [calibration_tag(seed, windows) for windows, seed in calibrations(table)]


def recovery_bars(table):
    """Issue 20's bar: with reconstruction and recovery, perplexity at 60% and 70% at least 20%
    below SparseGPT's, and at 50% at least half of SparseGPT's gap to dense closed, per text; a
    line for the default recovery row and one for each of fw_jax's other recovery rows, per
    calibration seed (against SparseGPT's row of the same seed), and where two or more seeds have
    both rows, one for their mean perplexities."""
    lines = []
    dense = table.get("dense", {})
    variants = [RECOVERED] + [m for m, spec in METHODS.items() if m != RECOVERED and spec["method"] == "sparsefw"
                              and spec.get("reconstruct") and spec.get("recover")]
    for setting, name in itertools.product(("50%", "60%", "70%"), variants):
        pairs = {(windows, seed): (table.get(f"{name} @ {setting}{calibration_tag(seed, windows)}"),
                                   table.get(f"sparsegpt @ {setting}{calibration_tag(seed, windows)}"))
                 for windows, seed in calibrations(table)}
        pairs = {calibration: pair for calibration, pair in pairs.items() if all(pair)}
        for (windows, seed), (ours, sgpt) in pairs.items():
            extra = ours.get("prune s", 0) - sgpt.get("prune s", 0)
            lines.append(f"- {setting}{calibration_tag(seed, windows)}, {name} vs sparsegpt: "
                         + _bar(setting, ours, sgpt, dense)
                         + f"; pruning time {ours.get('prune s', 0) / 60:.0f} min vs SparseGPT's "
                           f"{sgpt.get('prune s', 0) / 60:.0f} min (+{extra / 60:.0f} min)")
        for windows, group in itertools.groupby(pairs.items(), key=lambda item: item[0][0]):
            group = dict(group)  # the seeds with both rows at this number of windows
            if len(group) < 2:
                continue
            seeds = ", ".join(str(seed) for _, seed in group)
            ours, sgpt = ({key: float(np.mean([pair[i][key] for pair in group.values()])) for key in PERPLEXITIES}
                          for i in (0, 1))
            size = "" if windows == NSAMPLES else f", {windows} windows"
            lines.append(f"- {setting}, mean of seeds {seeds}{size}, {name} vs sparsegpt: "
                         + _bar(setting, ours, sgpt, dense))
    return (["## Issue 20's bar (recovery)", "", *lines, ""]) if lines else []


def _bar(setting, ours, sgpt, dense) -> str:
    """One verdict of issue 20's bar per text: at 50% half of SparseGPT's gap to dense closed,
    else 20% below SparseGPT."""
    parts = []
    for key in PERPLEXITIES:
        if setting == "50%":
            target = sgpt[key] - (sgpt[key] - dense[key]) / 2
            rule = f"half of SparseGPT's gap to dense closed: ≤ {target:.2f}"
        else:
            target = 0.8 * sgpt[key]
            rule = f"20% below SparseGPT's {sgpt[key]:.2f}: ≤ {target:.2f}"
        parts.append(f"{key.split()[0]} {ours[key]:.2f} ({rule}) {'**meets**' if ours[key] <= target else '**misses**'}")
    return "; ".join(parts)


def _compare(ours, theirs):
    parts = []
    for key in PERPLEXITIES:
        if key in ours and key in theirs:
            verdict = "**beats**" if ours[key] < theirs[key] else "**misses**"
            parts.append(f"{key.split()[0]} {ours[key]:.2f} vs {theirs[key]:.2f} {verdict}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
