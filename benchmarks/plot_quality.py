"""Draw the headline of the quality table: perplexity of each method at each sparsity.

Reads ``results/quality.json`` (written by ``benchmarks/quality_table.py``; nothing is measured
here) and writes ``results/quality.png``, the picture on the README's front page::

    python benchmarks/plot_quality.py

Two panels, one per evaluation text (held-out *Persuasion*, in the calibration's domain, and
CPython's pydoc text, out of it); in each, one group of bars per setting (50%, 60%, 70%, 2:4)
and one bar per method, on a log scale, with the dense model's perplexity as a line.
"""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

SETTINGS = ("50%", "60%", "70%", "2:4")
#: (label in the figure, row name in the table before " @ SETTING")
METHODS = (
    ("Wanda", "wanda"),
    ("SparseGPT", "sparsegpt"),
    ("fw_jax (mask only)", "sparsefw α=0.9 ρ=0.5"),
    ("fw_jax --reconstruct", "sparsefw α=0.9 ρ=0.5 + reconstruct"),
    ("fw_jax --reconstruct --recover", "sparsefw α=0.9 ρ=0.5 + reconstruct + recover"),
)
TEXTS = (("Persuasion ppl", "held-out Persuasion (in domain)"), ("pydoc-eval ppl", "pydoc text (out of domain)"))


def figure(table: dict, path: pathlib.Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    width = 0.8 / len(METHODS)
    for ax, (column, title) in zip(axes, TEXTS):
        for m, (label, row) in enumerate(METHODS):
            xs, ys = [], []
            for s, setting in enumerate(SETTINGS):
                cell = table.get(f"{row} @ {setting}")
                if cell is not None and cell.get(column) is not None:
                    xs.append(s + (m - (len(METHODS) - 1) / 2) * width)
                    ys.append(cell[column])
            ax.bar(xs, ys, width, label=label)
        ax.axhline(table["dense"][column], color="black", lw=1, ls="--", label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xticks(range(len(SETTINGS)), [f"{s} sparsity" if s != "2:4" else s for s in SETTINGS])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2-135M-Instruct, calibrated on 32×512 tokens of five Austen novels", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(ROOT / "results" / "quality.json"))
    parser.add_argument("--out", default=str(ROOT / "results" / "quality.png"))
    args = parser.parse_args(argv)
    with open(args.table, encoding="utf-8") as f:
        table = json.load(f)["table"]
    missing = [f"{row} @ {s}" for _, row in METHODS for s in SETTINGS if f"{row} @ {s}" not in table]
    if missing or "dense" not in table:
        raise SystemExit(f"{args.table}: rows missing for the figure: {', '.join(missing) or 'dense'}")
    figure(table, pathlib.Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
