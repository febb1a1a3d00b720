"""PNG plots of a pruning run: per-layer error reduction vs Wanda, a per-block summary of the
whole model, and Frank-Wolfe convergence on one layer.

matplotlib is used with its Agg backend through an explicit ``Figure`` (no pyplot state, no
display needed), so plotting works in headless jobs and never changes the user's backend. Each
``plot_*`` function builds its figure in a ``_*_figure`` helper and saves it; tests read the
helper's axes (labels, lines, bars, legends) instead of the PNG.
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
_BETTER, _WORSE = "#4C72B0", "#C44E52"  # bars above / below Wanda
NO_BOUND = "no lower bound proved in any layer (use --certify N)"
NO_BOUNDS_COMPUTED = "no lower bounds: this method computes none"


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
    if not has_proved_bound(layer):
        return math.nan
    return error_reduction(float(layer["lower_bound"]), float(layer["wanda_error"]))


def has_proved_bound(layer: Mapping[str, Any]) -> bool:
    """Whether the layer's record holds a proved lower bound: one that is > 0 (a bound of 0 is
    true of every layer and proves nothing).

    Example:
      >>> has_proved_bound({"lower_bound": 1.5}), has_proved_bound({"lower_bound": 0.0}), has_proved_bound({})
      (True, False, False)
    """
    bound = layer.get("lower_bound")
    return bound is not None and float(bound) > 0


def _bound_note(layers: Sequence[Mapping[str, Any]]) -> str:
    """What the records say about lower bounds, for a subtitle."""
    proved = sum(has_proved_bound(layer) for layer in layers)
    if proved:
        return f"proved lower bound in {proved} of {len(layers)} layers"
    if any("lower_bound" in layer for layer in layers):
        return NO_BOUND
    return NO_BOUNDS_COMPUTED


def _check_keys(layers: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    if not layers:
        raise ValueError("no layers to plot")
    for i, layer in enumerate(layers):
        missing = [k for k in keys if k not in layer]
        if missing:
            raise ValueError(f"layer {i} ({layer.get('name', '?')}) has no {', '.join(missing)}")


def _save(fig: Figure, path: str | os.PathLike) -> str:
    fig.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def plot_error_reduction(
    layers: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "Layer error reduction vs Wanda",
) -> str:
    """Bar chart of each layer's error reduction vs Wanda, in model order.

    Bars are coloured by layer kind (q/k/v/o, gate/up/down, ...). Where a layer has a positive
    ``"lower_bound"`` (a proved one: no mask of that budget has a smaller error), a black tick
    marks the largest reduction any mask could reach,
    ``100 · (wanda_error - lower_bound) / wanda_error``. The subtitle says in how many layers a
    bound was proved, or that none was. With many layers the x axis is labelled by block; with
    few, by layer. Not meaningful for ``wanda`` without reconstruction (all zeros): see
    :attr:`fw_jax.pipeline.PruneSettings.compares_with_wanda`.

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
    return _save(_error_reduction_figure(layers, title), path)


def _error_reduction_figure(layers: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """The figure :func:`plot_error_reduction` saves: one axes, a bar per layer (in
    ``ax.patches``), the proved bounds as a scatter (``ax.collections``, only if any)."""
    _check_keys(layers, ("name", "error", "wanda_error"))
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
                                  label="best possible\n(proved lower bound)"))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("error reduction vs Wanda (%)")
    mean = np.nanmean(reduction) if np.isfinite(reduction).any() else math.nan
    ax.set_title(f"{title}\n{n} layers, mean {mean:+.1f}% (positive: lower error than Wanda); "
                 f"{_bound_note(layers)}")
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
    return fig


def layer_block(layer: Mapping[str, Any], index: int = 0) -> int:
    """The decoder block a layer record belongs to: its ``"block"``, else the block number in
    its name (``model.layers.12.mlp.up_proj`` → 12). Raises ``ValueError`` naming the layer
    when neither says (e.g. a linen model's ``dense_1``); ``index`` is its place, for the message.

    Example:
      >>> layer_block({"name": "model.layers.12.mlp.up_proj"}), layer_block({"name": "x", "block": 3})
      (12, 3)
    """
    if layer.get("block") is not None:
        return int(layer["block"])
    block = _block(str(layer.get("name", "")))
    if block is None:
        raise ValueError(f"layer {index} ({layer.get('name', '?')}) has no \"block\" and its name "
                         f"names none (like model.layers.N.…): cannot plot it per block")
    return block


def plot_blocks(
    layers: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "Per-block summary",
    compare_wanda: bool = True,
) -> str:
    """The whole model at a glance, one bar per decoder block (x axis: block index), in panels
    that share the x axis:

    * (a) mean error reduction vs Wanda of the block's layers, in % (positive: better than
      Wanda); only with ``compare_wanda`` (see :attr:`fw_jax.pipeline.PruneSettings.compares_with_wanda`);
    * (b) time per block: its calibration passes (``"block_calibration_seconds"``: the pass through
      the previous block that computed its inputs and the pass that summed its Gram matrices),
      then the sum of its layers' ``"seconds"``, stacked, and the total over the blocks; the
      first block's bar is marked as including JIT compilation (the first call of each shape
      compiles it);
    * (c) certificate ``(error − lower bound) / error`` (0: proved optimal), mean over the
      block's layers with a proved bound (``lower_bound > 0``), with ``k/n`` (layers proved /
      layers) above each bar. Records without ``"certificate"`` (Wanda, SparseGPT, ...) have no
      such panel; when no layer of the model has a proved bound there is none either, and the
      title says "no lower bound proved";
    * with block-wise recovery (records with ``"block_recovery"``, see
      :mod:`fw_jax.pipeline.recover`): the recovery's seconds stacked on (b), and a panel of the
      block's held-out loss against the dense block's output before and after recovery;
    * with a non-uniform allocation (records with ``"kept"`` and ``"size"`` whose blocks'
      sparsities differ): a panel of each block's sparsity, the overall one as a line.

    Args:
      layers: one dict per layer with ``"seconds"`` and ``"block"`` (or a name like
        ``model.layers.N.…``); ``"error"`` and ``"wanda_error"`` with ``compare_wanda``;
        optionally ``"lower_bound"``, ``"certificate"`` and ``"block_calibration_seconds"``
        (the same in every layer of a block; without it the panel says the calibration passes
        are not counted).
      path: PNG file to write.
      title: figure title.
      compare_wanda: draw panel (a).

    Returns:
      ``path`` as a string.

    Raises:
      ValueError: no layers, a key missing, or a layer whose block is unknown.

    Example:
      >>> plot_blocks([
      ...     {"name": "model.layers.0.mlp.up_proj", "block": 0, "seconds": 1.5, "error": 0.8,
      ...      "wanda_error": 1.0, "lower_bound": 0.5, "certificate": 0.375},
      ...     {"name": "model.layers.1.mlp.up_proj", "block": 1, "seconds": 1.2, "error": 0.9,
      ...      "wanda_error": 1.0, "lower_bound": 0.0, "certificate": 1.0},
      ... ], "out/blocks.png", title="SmolLM2, sparsefw 50%")
      'out/blocks.png'
    """
    return _save(_blocks_figure(layers, title, compare_wanda), path)


def _per_block(layers: Sequence[Mapping[str, Any]], compare_wanda: bool) -> dict[str, np.ndarray]:
    """Per-block series of :func:`plot_blocks`, blocks in increasing order."""
    _check_keys(layers, ("seconds",) + (("error", "wanda_error") if compare_wanda else ()))
    of_layer = np.array([layer_block(layer, i) for i, layer in enumerate(layers)])
    blocks = np.unique(of_layer)
    reduction = np.array([error_reduction(float(l["error"]), float(l["wanda_error"])) if compare_wanda
                          else math.nan for l in layers])
    seconds = np.array([float(l["seconds"]) for l in layers])
    proved = np.array([has_proved_bound(l) and "certificate" in l for l in layers])
    certificate = np.array([float(l["certificate"]) if p else math.nan for l, p in zip(layers, proved)])
    recovery = [l.get("block_recovery") for l in layers]
    kept = np.array([float(l.get("kept", math.nan)) for l in layers])
    size = np.array([float(l.get("size", math.nan)) for l in layers])
    calibration = np.array([float(l.get("block_calibration_seconds", math.nan)) for l in layers])
    out = {"block": blocks, "reduction": [], "seconds": [], "certificate": [], "proved": [], "layers": [],
           "recovery_seconds": [], "heldout_before": [], "heldout_after": [], "sparsity": [],
           "calibration_seconds": []}
    for b in blocks:
        here = of_layer == b
        r, c = reduction[here], certificate[here]
        out["reduction"].append(np.nanmean(r) if np.isfinite(r).any() else math.nan)
        out["seconds"].append(seconds[here].sum())
        out["certificate"].append(np.nanmean(c) if np.isfinite(c).any() else math.nan)
        out["proved"].append(int(proved[here].sum()))
        out["layers"].append(int(here.sum()))
        known = calibration[here][np.isfinite(calibration[here])]
        out["calibration_seconds"].append(known[0] if len(known) else math.nan)  # one per block
        block_recovery = next((rec for rec, h in zip(recovery, here) if h and rec), None)  # one per block
        for key, field in (("recovery_seconds", "seconds"), ("heldout_before", "heldout_before"),
                           ("heldout_after", "heldout_after")):
            out[key].append(math.nan if block_recovery is None else float(block_recovery[field]))
        out["sparsity"].append(1.0 - kept[here].sum() / size[here].sum())
    out = {k: np.asarray(v) for k, v in out.items()}
    out["overall_sparsity"] = 1.0 - kept.sum() / size.sum()  # nan when a record has no counts
    return out


def _has_allocation(data: Mapping[str, Any]) -> bool:
    """Whether the blocks' sparsities differ (a non-uniform allocation), all of them known."""
    sparsity = data["sparsity"]
    return bool(np.isfinite(sparsity).all() and sparsity.max() - sparsity.min() > 1e-3)


def _blocks_figure(layers: Sequence[Mapping[str, Any]], title: str, compare_wanda: bool = True) -> Figure:
    """The figure :func:`plot_blocks` saves. Its axes carry gids ``"reduction"``, ``"seconds"``,
    ``"certificate"``, ``"recovery"`` and ``"sparsity"`` (those drawn, top to bottom); each has
    one bar per block in ``ax.patches``, at x = the block index (``"seconds"`` then the recovery's
    stacked bars; ``"recovery"`` the bars before, at x − 0.2, then those after, at x + 0.2)."""
    data = _per_block(layers, compare_wanda)
    blocks = data["block"]
    has_certificates = any("certificate" in layer for layer in layers)
    any_proved = bool(data["proved"].sum())
    recovered = bool(np.isfinite(data["recovery_seconds"]).any())
    panels = ((["reduction"] if compare_wanda else []) + ["seconds"] + (["certificate"] if any_proved else [])
              + (["recovery"] if recovered else []) + (["sparsity"] if _has_allocation(data) else []))
    width = min(max(9.0, 0.28 * len(blocks) + 3.5), 16.0)
    fig = Figure(figsize=(width, 1.2 + 2.5 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    notes = [f"{len(blocks)} blocks, {len(layers)} layers"]
    if not compare_wanda:
        notes.append("not compared with Wanda (the masks are Wanda's)")
    if has_certificates and not any_proved:
        notes.append(f"{NO_BOUND}: no certificate panel")
    elif not has_certificates:
        notes.append(NO_BOUNDS_COMPUTED)
    fig.suptitle("\n".join([title, "; ".join(notes)]))
    letters = iter("abcde")
    for ax, panel in zip(axes, panels):
        ax.set_gid(panel)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        letter = next(letters)
        if panel == "reduction":
            values = data["reduction"]
            ax.bar(blocks, values, width=0.8, zorder=2,
                   color=[_BETTER if not v < 0 else _WORSE for v in values])
            ax.axhline(0.0, color="black", linewidth=0.8)
            mean = np.nanmean(values) if np.isfinite(values).any() else math.nan
            ax.set_title(f"({letter}) mean error reduction of the block's layers vs Wanda "
                         f"(positive: lower error than Wanda); mean over blocks {mean:+.1f}%",
                         fontsize=10, loc="left")
            ax.set_ylabel("error reduction\nvs Wanda (%)")
        elif panel == "seconds":
            _time_panel(ax, letter, blocks, data, recovered)
        elif panel == "recovery":
            before, after = data["heldout_before"], data["heldout_after"]
            ax.bar(blocks - 0.2, before, width=0.4, color="#C8C8C8", zorder=2, label="before recovery")
            ax.bar(blocks + 0.2, after, width=0.4, color="#DD8452", zorder=2, label="after recovery")
            ax.set_yscale("log")
            ax.legend(fontsize=8, loc="upper left")
            ratio = np.nanmedian(after / before)
            ax.set_title(f"({letter}) held-out loss of the block's output against the dense block's "
                         f"(mean squared difference); median after/before {ratio:.2f}", fontsize=10, loc="left")
            ax.set_ylabel("loss vs dense")
        elif panel == "sparsity":
            values = 100 * data["sparsity"]
            ax.bar(blocks, values, width=0.8, color="#4C72B0", zorder=2)
            overall = 100 * data["overall_sparsity"]
            ax.axhline(overall, color="black", linewidth=0.8)
            ax.set_ylim(max(0.0, values.min() - 5), min(100.0, values.max() + 5))
            ax.set_title(f"({letter}) sparsity of the block's layers (allocation); the line: the model's, "
                         f"{overall:.2f}%", fontsize=10, loc="left")
            ax.set_ylabel("sparsity (%)")
        else:
            values = data["certificate"]
            ax.bar(blocks, values, width=0.8, color="#55A868", zorder=2)
            top = max(float(np.nanmax(values)), 0.1)  # all 0 (every layer proved optimal) still reads
            for b, v, k, n in zip(blocks, values, data["proved"], data["layers"]):
                ax.text(b, (v if np.isfinite(v) else 0.0) + 0.02 * top, f"{k}/{n}",
                        ha="center", va="bottom", fontsize=7 if len(blocks) <= 40 else 6)
            ax.set_ylim(0.0, top * 1.18)
            ax.set_title(f"({letter}) certificate (error − bound) / error, mean over layers with a proved "
                         f"bound (0: proved optimal); k/n = layers proved / layers", fontsize=10, loc="left")
            ax.set_ylabel("certificate")
    bottom = axes[-1]
    step = max(1, math.ceil(len(blocks) / 40))
    bottom.set_xticks(blocks[::step])
    bottom.set_xlim(blocks.min() - 0.7, blocks.max() + 0.7)
    bottom.set_xlabel("block")
    return fig


def _time_panel(ax, letter: str, blocks: np.ndarray, data: Mapping[str, Any], recovered: bool) -> None:
    """Panel (b) of :func:`plot_blocks`: per block, its calibration passes, its layers and its
    recovery, stacked in that order (each part's bars in ``ax.patches``, in that order), the
    total over the blocks in the title and the first block marked as including compilation."""
    calibration = data["calibration_seconds"]
    parts = [("calibration passes", np.nan_to_num(calibration), "#C8C8C8")] if np.isfinite(calibration).any() else []
    parts.append(("layers", data["seconds"], "#8C8C8C"))
    if recovered:
        parts.append(("recovery", np.nan_to_num(data["recovery_seconds"]), "#DD8452"))
    bottom = np.zeros(len(blocks))
    for label, values, colour in parts:
        ax.bar(blocks, values, bottom=bottom, width=0.8, color=colour, zorder=2, label=label)
        bottom = bottom + values
    if len(parts) > 1:
        ax.legend(fontsize=8, loc="upper right")
    total = f"total {_duration(bottom.sum())}"
    if len(parts) > 1:
        total += " (" + " + ".join(f"{label} {_duration(values.sum())}" for label, values, _ in parts) + ")"
    what = ", then ".join(f"its {label}" for label, _, _ in parts)
    unknown = "" if parts[0][0] == "calibration passes" else " (calibration passes not recorded)"
    ax.set_title(f"({letter}) time per block: {what}; {total}{unknown}", fontsize=10, loc="left")
    ax.set_ylabel("time (s)")
    top = float(bottom.max()) if len(bottom) else 0.0
    ax.set_ylim(0.0, max(top, 1e-9) * 1.22)  # room for the note above the first bar
    ax.annotate("includes JIT\ncompilation", xy=(blocks[0] - 0.4, bottom[0]), xytext=(0, 3),
                textcoords="offset points", ha="left", va="bottom", fontsize=7, gid="compilation")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plot_convergence(
    history: Mapping[str, Any] | Any,
    path: str | os.PathLike,
    title: str,
    references: Mapping[str, float] | None = None,
    *,
    matrix: str = "G",
) -> str:
    """Relaxed and rounded layer error, and the Frank-Wolfe gap, against iteration (log scale).

    Top panel: the error ``tr(ΔW · M · ΔWᵀ)`` of the relaxed iterate and of its rounding to a
    binary mask on the matrix the solver fitted (``‖(W - M⊙W) X‖²`` for ``G = XXᵀ``), with
    optional horizontal reference lines (e.g. the warm start's error, a proved lower bound) that
    must be measured on that same matrix. Bottom panel: the FW gap, the certificate
    ``relaxed error - optimum ≤ gap``. Entries that are NaN (past the last iteration) are not
    drawn; non-positive values (and references) are left out of the log scale.

    Args:
      history: ``"relaxed_loss"``, ``"rounded_loss"`` and ``"gap"`` arrays of one length, as a
        mapping or an object with those attributes (the solver's ``FWHistory``).
      path: PNG file to write.
      title: plot title (e.g. the layer name).
      references: ``{label: error}`` drawn as dashed horizontal lines on the error panel.
      matrix: the matrix the history and every reference are measured on, as shown in the y
        label (``"G"``, ``"F = 0.5·G + 0.5·diag(G)"``); the curve labels name it by what
        precedes its ``=``.

    Returns:
      ``path`` as a string.

    Example:
      >>> plot_convergence(solution.history, "out/convergence.png", "model.layers.3.mlp.down_proj",
      ...                  references={"warm start (wanda)": 1.9}, matrix="F = 0.5·G + 0.5·diag(G)")
      'out/convergence.png'
    """
    return _save(_convergence_figure(history, title, references, matrix=matrix), path)


def _convergence_figure(history: Mapping[str, Any] | Any, title: str,
                        references: Mapping[str, float] | None = None, *, matrix: str = "G") -> Figure:
    """The figure :func:`plot_convergence` saves: two axes (error, gap), their curves in
    ``ax.lines`` (references are the dashed ones)."""
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
    symbol = matrix.split("=", 1)[0].strip() or matrix

    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_err, ax_gap = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for key, label in (("relaxed_loss", "relaxed mask (continuous)"), ("rounded_loss", "rounded mask (binary)")):
        values = _positive(series[key][: len(iterations)])
        recorded = np.isfinite(values)  # the rounded error may be recorded every N-th iteration only
        sparse = recorded.sum() < len(values)
        ax_err.plot(iterations[recorded], values[recorded], "-", marker="o" if sparse else None, markersize=3,
                    label=f"{label} on {symbol}" + (" (every few iterations)" if sparse else ""), linewidth=1.6)
    for i, (label, value) in enumerate((references or {}).items()):
        if math.isfinite(value) and value > 0:
            ax_err.axhline(value, linestyle="--", linewidth=1.2, color=_PALETTE[(i + 2) % len(_PALETTE)],
                           label=f"{label} on {symbol}: {value:.4g}")
    ax_err.set_yscale("log")
    for axis_formatter in (ax_err.yaxis.set_major_formatter, ax_err.yaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))  # "2", not "2×10⁰"
    ax_err.set_ylabel(f"layer error on {matrix}\n" + ("‖(W − M⊙W)X‖²" if symbol == "G"
                                                    else f"tr(ΔW·{symbol}·ΔWᵀ), ΔW = W − M⊙W"))
    ax_err.grid(which="both", alpha=0.3)
    ax_err.legend(fontsize=9)
    ax_err.set_title(title)
    ax_gap.plot(iterations, _positive(series["gap"][: len(iterations)]), color="#C44E52", linewidth=1.4,
                label=f"Frank-Wolfe gap on {symbol} (bound on relaxed error − optimum)")
    ax_gap.set_yscale("log")
    ax_gap.set_ylabel(f"FW gap on {symbol}")
    ax_gap.set_xlabel("iteration")
    ax_gap.grid(which="both", alpha=0.3)
    ax_gap.legend(fontsize=9)
    return fig


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
