"""PNG plots of a pruning run: per-layer error reduction vs Wanda, and Frank-Wolfe convergence.

matplotlib is used with its Agg backend through an explicit ``Figure`` (no pyplot state, no
display needed), so plotting works in headless jobs and never changes the user's backend.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter

# Layer kinds in the order they run inside a block; colours stay the same from plot to plot.
_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "c_attn", "c_proj", "c_fc")
_PALETTE = ("#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD", "#DD8452",
            "#937860", "#DA8BC3", "#8C8C8C")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)\.")


def error_reduction(error: float, wanda_error: float) -> float:
    """Percent of Wanda's layer error removed: ``100 · (wanda_error - error) / wanda_error``.

    Positive: better than Wanda. NaN when Wanda's error is zero or not finite.

    Example:
      >>> error_reduction(0.75, 1.0)
      25.0
    """
    if not (math.isfinite(wanda_error) and wanda_error > 0 and math.isfinite(error)):
        return math.nan
    return 100.0 * (wanda_error - error) / wanda_error


def bound_reduction(layer: Mapping[str, Any]) -> float:
    """The largest reduction vs Wanda any mask could reach, from a *proved* lower bound: NaN when
    the layer has none (a bound of 0, what α > 0 or shrinkage often gives, proves nothing, and
    would draw as "100% possible").

    Example:
      >>> bound_reduction({"error": 2.1, "wanda_error": 3.0, "lower_bound": 1.5})
      50.0
    """
    bound = layer.get("lower_bound")
    if bound is None or not float(bound) > 0:
        return math.nan
    return error_reduction(float(bound), float(layer["wanda_error"]))


def plot_error_reduction(
    layers: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "Layer error reduction vs Wanda",
) -> str:
    """Bar chart of each layer's error reduction vs Wanda, in model order.

    Bars are coloured by layer kind (q/k/v/o, gate/up/down, ...). Where a layer has a positive
    ``"lower_bound"`` (a proved one: no mask of that budget has a smaller error), a black tick marks the largest reduction any mask could reach,
    ``100 · (wanda_error - lower_bound) / wanda_error``. With many layers the x axis is
    labelled by block; with few, by layer.

    Args:
      layers: one dict per layer, in model order, with ``"name"``, ``"error"`` and
        ``"wanda_error"``, optionally ``"lower_bound"``.
      path: PNG file to write (its folder must exist).
      title: plot title.

    Returns:
      ``path`` as a string.

    Example:
      >>> plot_error_reduction([
      ...     {"name": "model.layers.0.self_attn.q_proj", "error": 0.8, "wanda_error": 1.0},
      ...     {"name": "model.layers.0.mlp.down_proj", "error": 2.1, "wanda_error": 3.0,
      ...      "lower_bound": 1.5},
      ... ], "out/error_reduction.png")
      'out/error_reduction.png'
    """
    if not layers:
        raise ValueError("no layers to plot")
    for i, layer in enumerate(layers):
        missing = [k for k in ("name", "error", "wanda_error") if k not in layer]
        if missing:
            raise ValueError(f"layer {i} ({layer.get('name', '?')}) has no {', '.join(missing)}")
    names = [str(layer["name"]) for layer in layers]
    reduction = np.array([error_reduction(float(l["error"]), float(l["wanda_error"])) for l in layers])
    bound = np.array([bound_reduction(l) for l in layers])
    kinds = [_kind(n) for n in names]
    rank = {k: i for i, k in enumerate(_KIND_ORDER)}
    kind_list = sorted(set(kinds), key=lambda k: (rank.get(k, len(rank)), k))
    colour = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(kind_list)}

    n = len(layers)
    fig = Figure(figsize=(min(max(9.0, 0.1 * n + 4.0), 16.0), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(reduction), width=0.8, color=[colour[k] for k in kinds], zorder=2)
    handles = [Patch(color=colour[k], label=k) for k in kind_list]
    if np.isfinite(bound).any():
        handles.append(ax.scatter(x, bound, marker="_", s=max(30.0, 900.0 / n), color="black", zorder=3,
                                  label="best possible (certified bound)"))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("error reduction vs Wanda (%)")
    mean = np.nanmean(reduction) if np.isfinite(reduction).any() else math.nan
    ax.set_title(f"{title}\n{n} layers, mean {mean:+.1f}% (positive: lower error than Wanda)")
    blocks = [_block(name) for name in names]
    if n > 40 and all(b is not None for b in blocks):
        starts = [i for i in range(n) if i == 0 or blocks[i] != blocks[i - 1]]
        ends = starts[1:] + [n]
        shown = range(0, len(starts), max(1, math.ceil(len(starts) / 40)))
        ax.set_xticks([(starts[j] + ends[j] - 1) / 2 for j in shown])
        ax.set_xticklabels([str(blocks[starts[j]]) for j in shown])
        ax.tick_params(axis="x", length=0)
        ax.set_xlabel("block (layers in model order)")
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="grey", linewidth=0.4, alpha=0.5, zorder=1)
    else:
        ax.set_xticks(x)
        ax.set_xticklabels([_short_name(name) for name in names], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("layer (model order)")
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer")
    fig.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def plot_convergence(
    history: Mapping[str, Any] | Any,
    path: str | os.PathLike,
    title: str,
    references: Mapping[str, float] | None = None,
) -> str:
    """Relaxed and rounded layer error, and the Frank-Wolfe gap, against iteration (log scale).

    Top panel: the error ``||(W - M⊙W) X||²`` of the relaxed iterate and of its rounding to a
    binary mask, with optional horizontal reference lines (e.g. Wanda's error). Bottom panel:
    the FW gap, the certificate ``relaxed error - optimum ≤ gap``. Entries that are NaN (past the
    last iteration) are not drawn; non-positive values are left out of the log scale.

    Args:
      history: ``"relaxed_loss"``, ``"rounded_loss"`` and ``"gap"`` arrays of one length, as a
        mapping or an object with those attributes (the solver's ``FWHistory``).
      path: PNG file to write.
      title: plot title (e.g. the layer name).
      references: ``{label: error}`` drawn as dashed horizontal lines on the error panel.

    Returns:
      ``path`` as a string.

    Example:
      >>> plot_convergence(solution.history, "out/convergence.png",
      ...                  "model.layers.3.mlp.down_proj", references={"Wanda": 1.9})
      'out/convergence.png'
    """
    series = {}
    for key in ("relaxed_loss", "rounded_loss", "gap"):
        value = history.get(key) if isinstance(history, Mapping) else getattr(history, key, None)
        if value is None:
            raise ValueError(f"history has no {key!r}")
        series[key] = np.asarray(value, dtype=np.float64).reshape(-1)
    if len({len(v) for v in series.values()}) != 1:
        raise ValueError(f"history arrays differ in length: { {k: len(v) for k, v in series.items()} }")
    done = np.logical_or.reduce([np.isfinite(v) for v in series.values()])
    if not done.any():
        raise ValueError("history has no finite values (was it recorded with history=True?)")
    iterations = np.arange(len(done))[: int(np.nonzero(done)[0][-1]) + 1]

    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_err, ax_gap = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for key, label, style in (("relaxed_loss", "relaxed mask (continuous)", "-"),
                              ("rounded_loss", "rounded mask (binary)", "-")):
        ax_err.plot(iterations, _positive(series[key][: len(iterations)]), style, label=label, linewidth=1.6)
    for i, (label, value) in enumerate((references or {}).items()):
        if math.isfinite(value) and value > 0:
            ax_err.axhline(value, linestyle="--", linewidth=1.2, color=_PALETTE[(i + 2) % len(_PALETTE)],
                           label=f"{label}: {value:.4g}")
    ax_err.set_yscale("log")
    for axis_formatter in (ax_err.yaxis.set_major_formatter, ax_err.yaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))  # "2", not "2×10⁰"
    ax_err.set_ylabel("layer error ‖(W − M⊙W)X‖²")
    ax_err.grid(which="both", alpha=0.3)
    ax_err.legend(fontsize=9)
    ax_err.set_title(title)
    ax_gap.plot(iterations, _positive(series["gap"][: len(iterations)]), color="#C44E52", linewidth=1.4,
                label="Frank-Wolfe gap (bound on relaxed error − optimum)")
    ax_gap.set_yscale("log")
    ax_gap.set_ylabel("FW gap")
    ax_gap.set_xlabel("iteration")
    ax_gap.grid(which="both", alpha=0.3)
    ax_gap.legend(fontsize=9)
    fig.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1] != "weight" else name.rsplit(".", 2)[-2]


def _block(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _short_name(name: str) -> str:
    """``model.layers.12.self_attn.q_proj`` → ``12.q_proj``."""
    block = _block(name)
    return f"{block}.{_kind(name)}" if block is not None else name
