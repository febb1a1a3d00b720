"""Tests of fw_jax.pipeline.plots: the figures hold the data their titles announce (read from the
figures' axes, not the PNGs), the PNG files are written and the inputs are checked."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest

from fw_jax.pipeline.plots import (
    _blocks_figure, _convergence_figure, _error_reduction_figure, error_reduction,
    layer_block, plot_blocks, plot_convergence, plot_error_reduction,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer_records(blocks: int, with_bound: bool = True, bounds: str = "proved") -> list[dict]:
    """Records shaped like prune_model's for a sparsefw run of ``blocks`` SmolLM2-like blocks.

    ``bounds``: ``"proved"`` (a bound > 0 in about 70% of the layers), ``"zero"`` (every bound
    0, what α > 0 or shrinkage gives without --certify) or ``"none"`` (no bound or certificate
    keys: wanda, sparsegpt, ...). ``with_bound=False`` is ``bounds="none"``.
    """
    bounds = bounds if with_bound else "none"
    rng = np.random.default_rng(0)
    records = []
    for b in range(blocks):
        for kind in KINDS:
            wanda = float(rng.uniform(0.5, 5.0))
            error = wanda * float(rng.uniform(0.5, 1.05))
            record = {"name": f"model.layers.{b}.{kind}", "block": b, "error": error, "wanda_error": wanda,
                      "seconds": float(rng.uniform(0.5, 2.0)) * (3.0 if kind.startswith("mlp") else 1.0)}
            if bounds != "none":
                bound = error * float(rng.uniform(0.3, 0.9)) if bounds == "proved" and rng.uniform() < 0.7 else 0.0
                record.update(lower_bound=bound, certificate=(error - bound) / error)
            records.append(record)
    return records


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_error_reduction():
    assert error_reduction(0.75, 1.0) == 25.0
    assert error_reduction(1.5, 1.0) == -50.0
    assert math.isnan(error_reduction(1.0, 0.0))


def test_only_a_proved_bound_is_drawn_as_best_possible():
    from fw_jax.pipeline.plots import bound_reduction

    assert bound_reduction({"error": 2.1, "wanda_error": 3.0, "lower_bound": 1.5}) == 50.0
    for unproved in (0.0, -1.0, None):  # 0 proves nothing; it must not show as "100% possible"
        assert math.isnan(bound_reduction({"error": 2.1, "wanda_error": 3.0, "lower_bound": unproved}))
    assert math.isnan(bound_reduction({"error": 2.1, "wanda_error": 3.0}))


def test_compares_with_wanda_is_false_only_for_wanda_own_masks():
    from fw_jax.pipeline import PruneSettings

    assert not PruneSettings(method="wanda").compares_with_wanda
    assert PruneSettings(method="wanda", reconstruct=True).compares_with_wanda
    for method in ("magnitude", "ria", "sparsegpt", "sparsefw", "sparsefw-published"):
        assert PruneSettings(method=method).compares_with_wanda, method


@pytest.mark.parametrize("blocks", [2, 30])  # labelled per layer, and per block
def test_error_reduction_plot_is_a_png(tmp_path, blocks):
    path = tmp_path / "reduction.png"
    assert plot_error_reduction(layer_records(blocks), path) == str(path)
    width, height = png_size(path)
    assert width > 500 and height > 300 and path.stat().st_size > 10_000


def test_error_reduction_plot_without_bounds_or_blocks(tmp_path):
    layers = [{"name": "dense_1", "error": 1.0, "wanda_error": 2.0},
              {"name": "dense_2", "error": 3.0, "wanda_error": 0.0}]  # no reduction defined
    plot_error_reduction(layers, tmp_path / "r.png", title="linen model")
    assert png_size(tmp_path / "r.png")[0] > 0
    with pytest.raises(ValueError, match="layer 0 .* has no wanda_error"):
        plot_error_reduction([{"name": "x", "error": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no layers"):
        plot_error_reduction([], tmp_path / "bad.png")


def test_error_reduction_figure_holds_one_bar_per_layer_and_the_proved_bounds():
    layers = layer_records(3)
    proved = [l for l in layers if l["lower_bound"] > 0]
    assert 0 < len(proved) < len(layers)
    ax, = _error_reduction_figure(layers, "run").axes
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([100 * (l["wanda_error"] - l["error"]) / l["wanda_error"] for l in layers])
    scatter, = ax.collections  # the ticks of best possible reductions: only where a bound is proved
    ticks = np.asarray(scatter.get_offsets())
    drawn = ticks[np.isfinite(ticks[:, 1])]
    expected = [(i, 100 * (l["wanda_error"] - l["lower_bound"]) / l["wanda_error"])
                for i, l in enumerate(layers) if l["lower_bound"] > 0]
    assert drawn.shape == (len(expected), 2) and np.allclose(drawn, expected)
    assert "best possible\n(proved lower bound)" in legend_texts(ax)
    assert f"proved lower bound in {len(proved)} of {len(layers)} layers" in ax.get_title()
    assert ax.get_ylabel() == "error reduction vs Wanda (%)"


@pytest.mark.parametrize("bounds, says", [("zero", "no lower bound proved in any layer (use --certify N)"),
                                          ("none", "this method computes none")])
def test_error_reduction_figure_says_when_no_bound_was_proved(bounds, says):
    ax, = _error_reduction_figure(layer_records(30, bounds=bounds), "run").axes
    assert len(ax.collections) == 0  # no tick at "100% possible" from a bound of 0
    assert not any("bound" in text for text in legend_texts(ax))
    assert says in ax.get_title()
    assert ax.get_xlabel() == "block (layers in model order)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in range(30)]


def convergence_history(length: int = 200, stop: int = 120) -> dict[str, np.ndarray]:
    t = np.arange(length, dtype=np.float64)
    history = {
        "relaxed_loss": 1.0 + 4.0 / (t + 1.0),
        "rounded_loss": 1.3 + 4.0 / (t + 1.0) ** 0.7,
        "gap": 10.0 / (t + 1.0),
    }
    for values in history.values():
        values[stop:] = np.nan
    return history


def test_convergence_plot_is_a_png(tmp_path):
    path = tmp_path / "convergence.png"
    history = convergence_history()
    history["gap"][5] = 0.0  # a zero gap cannot go on a log axis; it is skipped, not an error
    title = "model.layers.3.mlp.down_proj"
    assert plot_convergence(history, path, title, references={"Wanda": 2.5}) == str(path)
    width, height = png_size(path)
    assert width > 500 and height > 500 and path.stat().st_size > 10_000


def test_convergence_plot_accepts_a_named_tuple_and_checks_inputs(tmp_path):
    class History(NamedTuple):  # the shape of the solver's FWHistory
        relaxed_loss: np.ndarray
        rounded_loss: np.ndarray
        gap: np.ndarray

    history = History(**convergence_history(50, 50))
    plot_convergence(history, tmp_path / "c.png", "layer")
    assert png_size(tmp_path / "c.png")[0] > 0
    with pytest.raises(ValueError, match="no 'gap'"):
        plot_convergence({"relaxed_loss": [1.0], "rounded_loss": [1.0]}, tmp_path / "bad.png", "x")
    nan = [math.nan] * 3
    with pytest.raises(ValueError, match="no finite values"):
        plot_convergence({"relaxed_loss": nan, "rounded_loss": nan, "gap": nan}, tmp_path / "bad.png", "x")


def test_convergence_figure_names_the_matrix_of_every_line():
    matrix = "F = 0.5·G + 0.5·diag(G)"
    history = convergence_history(stop=120)
    fig = _convergence_figure(history, "layer", {"warm start (wanda)": 6.0, "lower bound": 0.0}, matrix=matrix)
    ax_err, ax_gap = fig.axes
    assert matrix in ax_err.get_ylabel()
    relaxed, rounded, warm = ax_err.lines  # the bound of 0 proves nothing: not drawn
    assert relaxed.get_label() == "relaxed mask (continuous) on F"
    assert rounded.get_label() == "rounded mask (binary) on F"
    assert warm.get_label() == "warm start (wanda) on F: 6" and warm.get_linestyle() == "--"
    assert np.asarray(warm.get_ydata()).tolist() == [6.0, 6.0]
    assert np.asarray(relaxed.get_xdata()).tolist() == list(range(120))  # NaN tail not drawn
    assert np.asarray(relaxed.get_ydata()) == pytest.approx(history["relaxed_loss"][:120])
    assert legend_texts(ax_err) == [relaxed.get_label(), rounded.get_label(), warm.get_label()]
    gap, = ax_gap.lines  # the gap panel stays
    assert "on F" in gap.get_label() and ax_gap.get_ylabel() == "FW gap on F"
    assert ax_err.get_title() == "layer"


def test_a_rounded_error_recorded_every_few_iterations_is_drawn_through_its_points():
    history = convergence_history(stop=120)
    history["rounded_loss"][np.arange(len(history["rounded_loss"])) % 4 != 0] = np.nan
    relaxed, rounded = _convergence_figure(history, "layer").axes[0].lines
    assert np.asarray(rounded.get_xdata()).tolist() == list(range(0, 120, 4))
    assert rounded.get_marker() == "o" and "every few iterations" in rounded.get_label()
    assert relaxed.get_marker() in (None, "None", "") and len(relaxed.get_xdata()) == 120


def test_convergence_figure_on_g_by_default():
    ax_err, ax_gap = _convergence_figure(convergence_history(), "layer", {"lower bound": 0.9}).axes
    assert ax_err.get_ylabel().startswith("layer error on G")
    assert [line.get_label() for line in ax_err.lines] == [
        "relaxed mask (continuous) on G", "rounded mask (binary) on G", "lower bound on G: 0.9"]
    assert ax_gap.get_ylabel() == "FW gap on G"


def blocks_by_hand(layers):
    """Per-block means and sums, computed here without the module's helpers."""
    out = {}
    for layer in layers:
        entry = out.setdefault(layer["block"], {"reduction": [], "seconds": 0.0, "certificate": [], "n": 0})
        entry["reduction"].append((layer["wanda_error"] - layer["error"]) / layer["wanda_error"] * 100)
        entry["seconds"] += layer["seconds"]
        entry["n"] += 1
        if layer.get("lower_bound", 0) > 0:
            entry["certificate"].append(layer["certificate"])
    return dict(sorted(out.items()))


def panels(fig) -> dict:
    return {ax.get_gid(): ax for ax in fig.axes}


def bars(ax) -> tuple[list[float], list[float]]:
    return ([p.get_x() + p.get_width() / 2 for p in ax.patches], [p.get_height() for p in ax.patches])


def test_block_figure_panels_hold_the_per_block_means_and_sums():
    layers = layer_records(30)
    expected = blocks_by_hand(layers)
    fig = _blocks_figure(layers, "SmolLM2, sparsefw 50%")
    assert [ax.get_gid() for ax in fig.axes] == ["reduction", "seconds", "certificate"]
    by_gid = panels(fig)
    for gid, values in (("reduction", [np.mean(e["reduction"]) for e in expected.values()]),
                        ("seconds", [e["seconds"] for e in expected.values()])):
        x, heights = bars(by_gid[gid])
        assert x == pytest.approx(list(range(30))), gid
        assert heights == pytest.approx(values), gid
    x, heights = bars(by_gid["certificate"])
    assert x == pytest.approx(list(range(30)))
    certificates = [np.mean(e["certificate"]) if e["certificate"] else math.nan for e in expected.values()]
    assert np.allclose(heights, certificates, equal_nan=True)
    assert [t.get_text() for t in by_gid["certificate"].texts] == [
        f"{len(e['certificate'])}/{e['n']}" for e in expected.values()]
    assert "positive: lower error than Wanda" in by_gid["reduction"].get_title(loc="left")
    assert by_gid["seconds"].get_ylabel() == "time (s)"
    assert fig.axes[-1].get_xlabel() == "block"
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == [str(b) for b in range(30)]
    assert fig.get_suptitle().startswith("SmolLM2, sparsefw 50%\n30 blocks, 210 layers")


def test_block_figure_without_a_proved_bound_says_so_instead_of_a_certificate_panel():
    fig = _blocks_figure(layer_records(30, bounds="zero"), "run")
    assert [ax.get_gid() for ax in fig.axes] == ["reduction", "seconds"]
    assert "no lower bound proved" in fig.get_suptitle()


def test_block_figure_of_a_wanda_run_is_only_the_time():
    layers = layer_records(30, bounds="none")
    fig = _blocks_figure(layers, "wanda", compare_wanda=False)
    assert [ax.get_gid() for ax in fig.axes] == ["seconds"]
    assert bars(fig.axes[0])[1] == pytest.approx([e["seconds"] for e in blocks_by_hand(layers).values()])
    assert "no lower bound proved" not in fig.get_suptitle()  # nothing was tried
    for layer in layers:  # and Wanda's own errors are not needed
        del layer["wanda_error"]
    assert len(_blocks_figure(layers, "wanda", compare_wanda=False).axes) == 1


def test_block_figure_shows_recovery_and_an_allocation():
    """Recovery's seconds stack on the layers' (once per block, though every layer of the block
    carries the record), its losses get a panel, and per-block sparsities one when they differ."""
    layers = layer_records(4, bounds="none")
    recovery = {b: {"seconds": 10.0 + b, "heldout_before": 0.1 * (b + 1), "heldout_after": 0.04 * (b + 1),
                    "loss_before": 0.0, "loss_after": 0.0} for b in range(4)}
    sparsity = [0.55, 0.65, 0.6, 0.6]
    for layer in layers:
        b = layer["block"]
        layer.update(block_recovery=recovery[b], size=1000, kept=round(1000 * (1 - sparsity[b])))
    fig = _blocks_figure(layers, "recovered", compare_wanda=False)
    assert [ax.get_gid() for ax in fig.axes] == ["seconds", "recovery", "sparsity"]
    by_gid = panels(fig)
    x, heights = bars(by_gid["seconds"])
    by_hand = [e["seconds"] for e in blocks_by_hand(layers).values()]
    assert heights == pytest.approx(by_hand + [10.0, 11.0, 12.0, 13.0])
    assert [p.get_y() for p in by_gid["seconds"].patches[4:]] == pytest.approx(by_hand)  # stacked
    assert "recovery 46.0 s" in by_gid["seconds"].get_title(loc="left")
    x, heights = bars(by_gid["recovery"])
    assert x == pytest.approx([-0.2, 0.8, 1.8, 2.8, 0.2, 1.2, 2.2, 3.2])
    assert heights == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.04, 0.08, 0.12, 0.16])
    assert "median after/before 0.40" in by_gid["recovery"].get_title(loc="left")
    x, heights = bars(by_gid["sparsity"])
    assert heights == pytest.approx([55.0, 65.0, 60.0, 60.0])
    assert "60.00%" in by_gid["sparsity"].get_title(loc="left")
    for layer in layers:  # a uniform sparsity has no panel
        layer["kept"] = 400
    assert [ax.get_gid() for ax in _blocks_figure(layers, "uniform", compare_wanda=False).axes] == [
        "seconds", "recovery"]


def test_block_of_a_layer_comes_from_its_record_or_its_name(tmp_path):
    layers = layer_records(2)
    for layer in layers:
        del layer["block"]
    assert [layer_block(l) for l in layers] == [0] * 7 + [1] * 7
    assert bars(panels(_blocks_figure(layers, "hf names"))["seconds"])[0] == pytest.approx([0, 1])
    assert layer_block({"name": "dense_1", "block": 4}) == 4
    linen = [{"name": "dense_1", "seconds": 1.0, "error": 1.0, "wanda_error": 2.0}]
    with pytest.raises(ValueError, match=r"layer 0 \(dense_1\) has no \"block\""):
        plot_blocks(linen, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no layers"):
        plot_blocks([], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="has no seconds"):
        plot_blocks([{"name": "model.layers.0.mlp.up_proj", "error": 1.0, "wanda_error": 1.0}], tmp_path / "bad.png")


def test_block_plot_is_a_png(tmp_path):
    path = tmp_path / "blocks.png"
    assert plot_blocks(layer_records(30), path, "run") == str(path)
    width, height = png_size(path)
    assert width > 500 and height > 500 and path.stat().st_size > 10_000


def report_of(settings, layers, history=None):
    from fw_jax.pipeline.prune import PruneReport

    return PruneReport(settings=settings, layers=layers, seconds=1.0, calibration={}, history=history)


def test_write_plots_skips_the_comparison_that_is_empty_by_construction(tmp_path):
    from fw_jax.pipeline.prune import PruneSettings
    from fw_jax.pipeline.run import _write_plots

    wanda = [dict(l, error=l["wanda_error"]) for l in layer_records(2, bounds="none")]
    (tmp_path / "w").mkdir()
    written = _write_plots(report_of(PruneSettings(method="wanda"), wanda), str(tmp_path / "w"))
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["blocks.png"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["blocks.png"]
    (tmp_path / "r").mkdir()
    written = _write_plots(report_of(PruneSettings(method="wanda", reconstruct=True), layer_records(2, bounds="none")),
                           str(tmp_path / "r"))
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["blocks.png", "error_reduction.png"]


@pytest.mark.parametrize("rho", [0.5, 0.0])
def test_write_plots_draws_convergence_references_of_the_fitted_matrix_only(tmp_path, monkeypatch, rho):
    from fw_jax.pipeline import plots
    from fw_jax.pipeline.prune import PruneSettings
    from fw_jax.pipeline.run import _write_plots

    calls = {}
    real = plots.plot_convergence
    monkeypatch.setattr(plots, "plot_convergence", lambda *a, **kw: calls.update(kw) or real(*a, **kw))
    layers = layer_records(2, bounds="zero")
    name = layers[0]["name"]
    if rho > 0:
        layers[0].update(shrunk_warm_error=5.0, shrunk_lower_bound=0.0, shrunk_certificate=1.0)
    else:
        layers[0].update(warm_error=layers[0]["wanda_error"], lower_bound=0.7)
    history = dict({k: [None if not np.isfinite(v) else float(v) for v in values]  # as in the report's JSON
                    for k, values in convergence_history().items()}, layer=name)
    written = _write_plots(report_of(PruneSettings(shrinkage=rho), layers, history), str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["blocks.png", "convergence.png", "error_reduction.png"]
    if rho > 0:  # only F's numbers; F's bound is 0, proving nothing: not drawn
        assert calls["matrix"] == "F = 0.5·G + 0.5·diag(G)"
        assert calls["references"] == {"warm start (wanda)": 5.0}
        assert "error on G is in prune_report.json" in calls["title"]
    else:
        assert calls["matrix"].startswith("G")
        assert calls["references"] == {"warm start (wanda)": layers[0]["wanda_error"], "lower bound": 0.7,
                                       "returned mask": layers[0]["error"]}


# --- The time panel: calibration passes and layers stacked, their total the run's; compilation marked.


def test_time_panel_stacks_each_block_s_calibration_passes_under_its_layers():
    layers = layer_records(5)
    for layer in layers:
        layer["block_calibration_seconds"] = 2.0 + layer["block"]  # the same in every layer of a block
    fig = _blocks_figure(layers, "run")
    ax = panels(fig)["seconds"]
    by_hand = [e["seconds"] for e in blocks_by_hand(layers).values()]
    x, heights = bars(ax)
    assert x == pytest.approx(list(range(5)) * 2)
    assert heights == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0] + by_hand)  # calibration, then layers
    assert [p.get_y() for p in ax.patches[5:]] == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0])  # stacked on it
    title = ax.get_title(loc="left")
    total = 20.0 + sum(by_hand)
    assert f"total {total:.1f} s (calibration passes 20.0 s + layers {sum(by_hand):.1f} s)" in title, title
    assert legend_texts(ax) == ["calibration passes", "layers"]
    (note,) = [t for t in ax.texts if t.get_gid() == "compilation"]
    assert "compilation" in note.get_text() and note.xy[1] == pytest.approx(2.0 + by_hand[0])  # atop block 0

    for layer in layers:  # records without the key (an older report): said, not guessed
        del layer["block_calibration_seconds"]
    ax = panels(_blocks_figure(layers, "run"))["seconds"]
    assert bars(ax)[1] == pytest.approx(by_hand)
    assert "(calibration passes not recorded)" in ax.get_title(loc="left")


def test_a_run_s_time_panel_adds_up_to_the_run_s_time(tmp_path, capsys):
    """The blocks.png of a real run: its total is the run's time (the report's ``seconds``) but
    for the embedding and saving, and each block's calibration bar is the one its log line gives."""
    import json
    import re

    from fw_jax.cli import main
    from fw_jax.pipeline.plots import _per_block
    from models_fixtures import random_torch_model, tiny_config
    from test_pipeline_data import char_tokenizer
    from test_pipeline_prune import TEXT

    model = tmp_path / "model"
    random_torch_model(tiny_config("llama", intermediate_size=64, max_position_embeddings=128),
                       seed=3).save_pretrained(model, safe_serialization=True)
    char_tokenizer().save_pretrained(model)
    (tmp_path / "calib.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prune", str(model), "--out", str(out), "--calib", str(tmp_path / "calib.txt"),
                 "--nsamples", "4", "--seqlen", "32", "--max-iter", "5"]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "prune_report.json").read_text())
    data = _per_block(report["layers"], compare_wanda=True)
    assert np.isfinite(data["calibration_seconds"]).all()
    total = float(data["calibration_seconds"].sum() + data["seconds"].sum())
    assert 0.9 * report["seconds"] <= total <= report["seconds"], (total, report["seconds"])
    for b, seconds in enumerate(data["calibration_seconds"]):
        assert re.search(rf"^block {b}: 7 layers in [\d.]+s \(calibration passes {seconds:.1f}s\)", err, re.M), err
    assert png_size(out / "blocks.png")[0] > 500
