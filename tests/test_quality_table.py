"""The quality table's computed sections: bars per seed and the rows of the grid not yet run."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _row(persuasion, pydoc):
    return {"Persuasion ppl": persuasion, "pydoc-eval ppl": pydoc}


def test_bars_compare_each_seed_and_say_beats_or_misses():
    import quality_table as q

    table = {
        f"{q.DEFAULT} @ 50%": _row(50.0, 30.0),
        "wanda @ 50%": _row(60.0, 29.0),
        f"{q.DEFAULT} @ 50% (seed 1)": _row(51.0, 31.0),
        "wanda @ 50% (seed 1)": _row(61.0, 32.0),
        "sparsegpt @ 2:4": _row(80.0, 100.0),
        f"{q.RECONSTRUCTED[-1]} @ 2:4": _row(79.0, 90.0),
    }
    lines = q.bars(table)
    assert f"- 50%, {q.DEFAULT} vs wanda: Persuasion 50.00 vs 60.00 **beats**; pydoc-eval 30.00 vs 29.00 **misses**" in lines
    assert f"- 50% (seed 1), {q.DEFAULT} vs wanda: Persuasion 51.00 vs 61.00 **beats**; pydoc-eval 31.00 vs 32.00 **beats**" in lines
    assert any(line.startswith(f"- 2:4, {q.RECONSTRUCTED[-1]} vs sparsegpt") and "misses" not in line for line in lines)
    assert not any("ria" in line for line in lines)  # no row, no verdict


def test_recovery_bars_judge_the_default_row_and_each_variant():
    import quality_table as q

    variant = f"{q.RECOVERED} (100 steps)"
    assert variant in q.METHODS
    table = {"dense": _row(40.0, 20.0), "sparsegpt @ 50%": _row(60.0, 40.0), f"{q.RECOVERED} @ 50%": _row(49.0, 31.0),
             f"{variant} @ 50%": _row(48.0, 29.5), "sparsegpt @ 60%": _row(100.0, 100.0),
             f"{q.RECOVERED} @ 60%": _row(80.0, 81.0)}
    lines = q.recovery_bars(table)
    assert lines[0] == "## Issue 20's bar (recovery)"
    ours = next(line for line in lines if line.startswith(f"- 50%, {q.RECOVERED} vs"))
    assert "Persuasion 49.00 (half of SparseGPT's gap to dense closed: ≤ 50.00) **meets**" in ours
    assert "pydoc-eval 31.00 (half of SparseGPT's gap to dense closed: ≤ 30.00) **misses**" in ours
    assert "pydoc-eval 29.50 (half of SparseGPT's gap to dense closed: ≤ 30.00) **meets**" in next(
        line for line in lines if line.startswith(f"- 50%, {variant} vs"))
    sixty = next(line for line in lines if line.startswith(f"- 60%, {q.RECOVERED} vs"))
    assert "Persuasion 80.00 (20% below SparseGPT's 100.00: ≤ 80.00) **meets**" in sixty and "**misses**" in sixty
    assert not any(line.startswith(f"- 60%, {variant}") for line in lines)  # no row, no verdict
    # fw_jax's other recovery rows (another shrinkage) are judged too; SparseGPT's own recovery is the rival's
    shrunk = "sparsefw α=0.9 ρ=0.75 + reconstruct + recover"
    table.update({f"{shrunk} @ 50%": _row(50.5, 28.0), "sparsegpt + recover @ 50%": _row(45.0, 25.0)})
    judged = q.recovery_bars(table)
    assert "Persuasion 50.50 (half of SparseGPT's gap to dense closed: ≤ 50.00) **misses**" in next(
        line for line in judged if line.startswith(f"- 50%, {shrunk} vs"))
    assert not any(line.startswith("- 50%, sparsegpt + recover") for line in judged)
    # another calibration seed is judged against SparseGPT's row of that seed, by the same rules
    table.update({"sparsegpt @ 50% (seed 1)": _row(50.0, 30.0), f"{q.RECOVERED} @ 50% (seed 1)": _row(46.0, 25.5)})
    seeded = next(line for line in q.recovery_bars(table) if line.startswith(f"- 50% (seed 1), {q.RECOVERED} vs"))
    assert ("Persuasion 46.00 (half of SparseGPT's gap to dense closed: ≤ 45.00) **misses**; "
            "pydoc-eval 25.50 (half of SparseGPT's gap to dense closed: ≤ 25.00) **misses**") in seeded
    # and the two seeds' mean perplexities: ours 47.5 / 28.25, SparseGPT's 55 / 35, so ≤ 47.5 / 27.5
    mean = next(line for line in q.recovery_bars(table) if line.startswith(f"- 50%, mean of seeds 0, 1, {q.RECOVERED}"))
    assert ("Persuasion 47.50 (half of SparseGPT's gap to dense closed: ≤ 47.50) **meets**; "
            "pydoc-eval 28.25 (half of SparseGPT's gap to dense closed: ≤ 27.50) **misses**") in mean
    assert not any("mean of seeds" in line and "60%" in line for line in q.recovery_bars(table))  # one seed only
    # rows calibrated on more windows are judged against SparseGPT's with the same windows, and
    # averaged apart from the 32-window rows
    table.update({"sparsegpt @ 50% (128 windows)": _row(58.0, 38.0), f"{q.RECOVERED} @ 50% (128 windows)": _row(47.0, 27.0),
                  "sparsegpt @ 50% (seed 1, 128 windows)": _row(52.0, 30.0),
                  f"{q.RECOVERED} @ 50% (seed 1, 128 windows)": _row(45.0, 24.0)})
    lines = q.recovery_bars(table)
    wide = next(line for line in lines if line.startswith(f"- 50% (128 windows), {q.RECOVERED} vs"))
    assert "pydoc-eval 27.00 (half of SparseGPT's gap to dense closed: ≤ 29.00) **meets**" in wide
    assert any(line.startswith(f"- 50% (seed 1, 128 windows), {q.RECOVERED} vs") for line in lines)
    assert mean in lines  # the 32-window mean is unchanged
    # ours 46 / 25.5, SparseGPT's 55 / 34, so ≤ 47.5 / 27
    wide_mean = next(line for line in lines if line.startswith(f"- 50%, mean of seeds 0, 1, 128 windows, {q.RECOVERED}"))
    assert ("Persuasion 46.00 (half of SparseGPT's gap to dense closed: ≤ 47.50) **meets**; "
            "pydoc-eval 25.50 (half of SparseGPT's gap to dense closed: ≤ 27.00) **meets**") in wide_mean


def test_calibration_tags_name_the_seed_and_the_number_of_windows():
    import quality_table as q

    assert q.calibration_tag(0, q.NSAMPLES) == ""
    assert q.calibration_tag(2, q.NSAMPLES) == " (seed 2)"
    assert q.calibration_tag(0, 128) == " (128 windows)"
    assert q.calibration_tag(1, 128) == " (seed 1, 128 windows)"
    table = {"dense": {}, "wanda @ 50% (seed 2)": {}, f"{q.RECOVERED} (token loss) @ 50%": {},
             "sparsegpt @ 2:4 (seed 1, 128 windows)": {}, "sparsegpt @ 50% (128 windows)": {}}
    assert q.calibration_tags(table) == ["", " (seed 2)", " (128 windows)", " (seed 1, 128 windows)"]
    assert [windows for windows, _ in q.calibrations(table)] == [q.NSAMPLES, q.NSAMPLES, 128, 128]


def test_missing_rows_are_listed_with_the_reason_where_known():
    import quality_table as q

    table = {f"{name} @ {setting}": _row(1.0, 1.0) for name in q.REQUIRED for setting in q.SETTINGS}
    assert q.missing(table) == []
    table["sparsefw published @ 2:4"]["prune s"] = 4358.0
    del table["sparsefw published @ 50%"], table["sparsefw published @ 60%"], table["ria @ 2:4"]
    lines = q.missing(table)
    assert lines[2] == "- ria @ 2:4"  # methods in REQUIRED's order, one line each
    assert lines[3].startswith("- sparsefw published @ 50%, 60%: 2000 open-loop iterations")
    assert "(measured: 2:4 73 min)" in lines[3]


def test_pivot_has_a_line_per_method_and_says_not_run():
    import quality_table as q

    table = {"dense": _row(10.0, 5.0), "wanda @ 50%": _row(20.0, 8.0), f"{q.DEFAULT} @ 2:4": _row(30.0, 9.0)}
    lines = q.pivot(table)
    assert "| dense | 10.0 / 5.0 | 10.0 / 5.0 | 10.0 / 5.0 | 10.0 / 5.0 |" in lines
    assert "| wanda | 20.0 / 8.0 | not run | not run | not run |" in lines  # 50%, 60%, 70%, 2:4
    assert f"| **{q.DEFAULT}** (fw_jax default) | not run | not run | not run | 30.0 / 9.0 |" in lines
    assert "| sparsefw published | not run | not run | not run | not run |" in lines


def test_readme_section_is_rewritten_between_the_markers_only(tmp_path):
    import pytest
    import quality_table as q

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{q.README_START}\nold table\n{q.README_END}\nafter\n", encoding="utf-8")
    table = {"dense": _row(37.4, 15.3), "wanda @ 50%": _row(70.1, 36.2)}
    q.update_readme(readme, table, [{"command": "x", "seconds": 120.0}])
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n" + q.README_START) and text.endswith(q.README_END + "\nafter\n")
    assert "old table" not in text and "| wanda | 70.1 / 36.2 |" in text and "2 minutes" in text
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no <!-- quality:start -->"):
        q.update_readme(readme, table, [])


def test_rows_are_merged_into_the_results_on_disk(tmp_path):
    import json

    import quality_table as q

    out = tmp_path / "quality"
    assert q.read_results(out) == ({}, [])
    this_run = {"command": "python benchmarks/quality_table.py --settings 60%", "seconds": 60.0, "started": "t1"}
    # Another invocation wrote the 50% row after this one started: it is kept, and this run's own
    # entry is replaced (not repeated) on every row it adds.
    out.with_suffix(".json").write_text(json.dumps({
        "commands": [{"command": "other", "seconds": 30.0, "started": "t0"}],
        "table": {"wanda @ 50%": _row(70.0, 36.0)},
    }))
    table, commands = q.merge_rows(out, {"wanda @ 60%": _row(139.0, 99.0)}, this_run)
    out.with_suffix(".json").write_text(json.dumps({"commands": commands, "table": table}))
    this_run["seconds"] = 120.0
    table, commands = q.merge_rows(out, {"ria @ 60%": _row(149.0, 98.0)}, this_run)
    assert set(table) == {"wanda @ 50%", "wanda @ 60%", "ria @ 60%"}
    assert [(c["command"], c["seconds"]) for c in commands] == [("other", 30.0), (this_run["command"], 120.0)]


def test_accuracy_pivot_shows_acc_and_stderr_per_setting():
    import quality_table

    table = {"dense": {"Persuasion ppl": 37.4, "pydoc-eval ppl": 15.3, "persuasion-cloze acc %": 41.0, "persuasion-cloze ±": 3.5},
             "wanda @ 50%": {"Persuasion ppl": 70.1, "pydoc-eval ppl": 36.2, "persuasion-cloze acc %": 30.5,
                             "persuasion-cloze ±": 3.3}}
    lines = quality_table.accuracy_pivot(table)
    assert "### persuasion-cloze acc" in lines
    assert "| dense | 41.0 ± 3.5 | 41.0 ± 3.5 | 41.0 ± 3.5 | 41.0 ± 3.5 |" in lines
    assert "| wanda | 30.5 ± 3.3 | - | - | - |" in lines
    assert quality_table.accuracy_pivot({"dense": {"Persuasion ppl": 1.0}}) == []
    norm = quality_table.accuracy_pivot({"dense": {"x acc %": 30.0, "x ±": 3.0, "x acc_norm %": 40.0, "x acc_norm ±": 3.4}})
    assert "### x acc_norm" in norm and "| dense | 40.0 ± 3.4 | 40.0 ± 3.4 | 40.0 ± 3.4 | 40.0 ± 3.4 |" in norm
    assert "| dense | 30.0 ± 3.0 | 30.0 ± 3.0 | 30.0 ± 3.0 | 30.0 ± 3.0 |" in norm


def test_a_row_pruned_again_for_its_accuracy_says_whether_it_is_the_same_model():
    import quality_table as q

    row = {"mean layer error vs Wanda": 0.5852647}
    same = q.reproduction_note("x @ 50%", row, {"summary": {"mean_error_vs_wanda": 0.5852647000001}})
    assert same == "x @ 50% re-pruned: mean layer error 0.5852647, as in the row"
    other = q.reproduction_note("x @ 50%", row, {"summary": {"mean_error_vs_wanda": 0.5861}})
    assert "not the row's 0.5852647" in other and "different model" in other
    assert "none to compare" in q.reproduction_note("x @ 50%", {}, {"summary": {"mean_error_vs_wanda": 0.5}})
    row.update({"Persuasion ppl": 57.796, "pydoc-eval ppl": 35.333})
    measured = q.reproduction_note("x @ 50%", row, {"summary": {"mean_error_vs_wanda": 0.6410773}},
                                   {"Persuasion": 57.890, "pydoc-eval": 35.654})
    assert measured.endswith("(this one's perplexity: 57.89 / 35.65, the row's 57.80 / 35.33, Persuasion / pydoc-eval)")
    assert q.reproduces(row, {"summary": {"mean_error_vs_wanda": 0.5852647}})
    assert not q.reproduces(row, {"summary": {"mean_error_vs_wanda": 0.6410773}}) and not q.reproduces({}, {"summary": {"mean_error_vs_wanda": 1.0}})


def _args(model, out, **extra):
    import argparse

    return argparse.Namespace(model=model, out=str(out), seqlen=512, eval_seqlen=512, max_windows=24, readme="", **extra)


def test_another_model_gets_its_own_file_and_title_and_keeps_the_intro(tmp_path):
    import json

    import pytest
    import quality_table as q

    out = tmp_path / "quality-gemma3"
    commands = [{"command": "python benchmarks/quality_table.py --model gemma3-270m", "seconds": 600.0,
                 "started": "2026-12-07T17:40:54+0000"}]
    table = {"dense": _row(20.0, 10.0), "wanda @ 50%": {**_row(30.0, 15.0), "prune s": 90.0, "peak RSS GB": 3.2}}
    q.write(out, table, commands, _args("gemma3-270m", out))
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["model"] == "gemma3-270m" and record["table"] == table
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Perplexity of pruned Gemma 3 270M")
    assert "started 2026-12-07T17:40:54+0000, 10 min" in text and "the 126 pruned layers" in text
    assert "BOS starts every calibration and evaluation window" in text
    # its own grid of rows: no published recipe, but SparseGPT with recovery
    assert "- wanda @ 60%, 70%, 2:4" in text and "- sparsegpt + recover @ 50%, 60%, 70%, 2:4" in text
    assert "sparsefw published" not in text and "sparsefw published" in "\n".join(q.missing(table))
    # a paragraph written by hand between the intro markers survives every rewrite
    out.with_suffix(".md").write_text(f"# old title\n\n{q.INTRO_START}\nBy hand.\n{q.INTRO_END}\n\nold body\n")
    q.write(out, table, commands, _args("gemma3-270m", out))
    text = out.with_suffix(".md").read_text()
    assert f"{q.INTRO_START}\nBy hand.\n{q.INTRO_END}" in text and "old body" not in text
    # one model's results are never mixed into another's file
    q.check_model_of(out, "gemma3-270m")
    with pytest.raises(SystemExit, match="holds gemma3-270m's rows, not smollm2-135m's"):
        q.check_model_of(out, "smollm2-135m")
    smollm2 = tmp_path / "quality"
    q.write(smollm2, {"dense": _row(37.4, 15.3)}, commands, _args("smollm2-135m", smollm2))
    assert "model" not in json.loads(smollm2.with_suffix(".json").read_text())  # as results/quality.json
    assert smollm2.with_suffix(".md").read_text().startswith("# Perplexity of pruned SmolLM2-135M-Instruct")
    with pytest.raises(SystemExit, match="holds smollm2-135m's rows, not gemma3-270m's"):
        q.check_model_of(smollm2, "gemma3-270m")


def test_the_side_by_side_page_is_what_both_models_json_gives():
    """results/quality-models.md is rendered from the two tables' JSON files: never edited by hand
    out of step with them (quality_table.py rewrites it after every row)."""
    import quality_table as q

    tables = {m: json.loads((ROOT / "results" / f"{q.MODELS[m]['out']}.json").read_text())["table"] for m in q.MODELS}
    page = q.SIDE_BY_SIDE.read_text()
    assert page == q.side_by_side(tables)
    default_50 = tables["gemma3-270m"][f"{q.DEFAULT} @ 50%"]
    assert f"{default_50['Persuasion ppl']:.1f} / {default_50['pydoc-eval ppl']:.1f}" in page.split("## 60%")[0]
