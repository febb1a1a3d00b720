"""Tests of fw_jax.pipeline.plots: the PNG files are written and the inputs are checked."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest

from fw_jax.pipeline.plots import error_reduction, plot_convergence, plot_error_reduction

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer_records(blocks: int, with_bound: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for b in range(blocks):
        for kind in KINDS:
            wanda = float(rng.uniform(0.5, 5.0))
            error = wanda * float(rng.uniform(0.5, 1.05))
            record = {"name": f"model.layers.{b}.{kind}", "error": error, "wanda_error": wanda}
            if with_bound:
                record["lower_bound"] = error * 0.8
            records.append(record)
    return records


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


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
