"""The shared checks of counts and rates (fw_jax._checks), the settings that use them, and the
solver's import order (the swaps know nothing of the budgets)."""

import ast
import pathlib

import numpy as np
import pytest

import fw_jax
from fw_jax._checks import check_int, check_number
from fw_jax.pipeline import FinetuneSettings, RecoverSettings


@pytest.mark.parametrize("value, least, message", [
    (True, None, "k must be an int, got True"),
    (2.0, None, "k must be an int, got 2.0"),
    ("3", 1, "k must be an int ≥ 1, got '3'"),
    (0, 1, "k must be an int ≥ 1, got 0"),
    (np.int64(-1), 0, "k must be an int ≥ 0, got np.int64\\(-1\\)"),
])
def test_check_int_refuses_what_is_not_a_count(value, least, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("k", value, least)


def test_check_int_returns_plain_ints():
    for value in (np.int32(3), 3, np.uint8(3)):
        got = check_int("k", value, least=3)
        assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, True, "1", np.float32(0.5)])
def test_check_number_refuses_what_is_not_a_finite_rate(value):
    with pytest.raises(ValueError, match="^rate must be a finite number ≥ 0, got "):
        check_number("rate", value)
    assert check_number("rate", 0.25) == 0.25 and check_number("rate", 2, low=2) == 2


def test_the_settings_refuse_in_the_same_words_and_record_plain_ints():
    with pytest.raises(ValueError, match="^recover steps must be an int ≥ 0, got -1$"):
        RecoverSettings(steps=-1)
    with pytest.raises(ValueError, match="^finetune weight_decay must be a finite number ≥ 0, got nan$"):
        FinetuneSettings(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="^SolverOptions.refresh_every must be an int ≥ 1, got 0$"):
        fw_jax.SolverOptions(refresh_every=0)
    with pytest.raises(ValueError, match="^PerRow.k must be an int, got 2.5$"):
        fw_jax.PerRow(2.5).check(4, 8)
    for settings, field in ((RecoverSettings(steps=np.int64(7)), "steps"),
                            (fw_jax.SolverOptions(max_iter=np.int32(7)), "max_iter")):
        assert type(getattr(settings, field)) is int and getattr(settings, field) == 7


def test_the_swaps_import_nothing_of_the_budgets():
    """``_budgets.py`` uses ``_swaps.py``; the other way round would be an import circle."""
    source = pathlib.Path(fw_jax.solver.__file__).with_name("_swaps.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not any("_budgets" in (name or "") for name in imported), imported
    assert fw_jax.solver.swap_refine.__module__ == "fw_jax.solver._budgets"
