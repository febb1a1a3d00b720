"""benchmarks/profile_block.py runs end to end on a tiny block, and its table is whole."""

import json
import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_block  # noqa: E402

EARLIER = "# Scale\n\n## An earlier section\n\n| a | b |\n|--|--|\n| 1 | 2 |\n"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    results = folder / "scale.json"
    results.write_text(json.dumps({"7b": {"rows": [1, 2]}}))
    results.with_suffix(".md").write_text(EARLIER)
    assert profile_block.main(["--tiny", "--out", str(folder / "work"), "--results", str(results)]) == 0
    return results


def _table(section: str) -> dict:
    """``{phase: (seconds, share)}`` of the section's first table."""
    rows = {}
    for line in section.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].endswith("%") and not cells[0].startswith("**"):
            rows[cells[0]] = (float(cells[1]), float(cells[2].rstrip("%")) / 100)
        elif rows and not line.strip():
            break
    return rows


def test_the_table_has_every_phase_with_positive_seconds_and_shares_summing_to_one(profiled):
    text = profiled.with_suffix(".md").read_text()
    section = text[text.index(profile_block.TITLES["tiny"]):]
    table = _table(section)
    labels = [label for _, label, _ in profile_block.ROWS]
    assert len(table) == len(labels)
    for label in labels:
        match = [name for name in table if name.startswith(label.split(" (")[0].split(":")[0])]
        assert match, f"no row for {label!r} in {sorted(table)}"
        assert table[match[0]][0] > 0, f"{label}: {table[match[0]][0]} s"
    assert sum(share for _, share in table.values()) == pytest.approx(1.0, abs=0.01)
    total = float(re.search(r"\| \*\*block\*\* \| \*\*([0-9.e+-]+)\*\*", section).group(1))
    assert sum(seconds for seconds, _ in table.values()) == pytest.approx(total, rel=0.1)


def test_the_json_keeps_what_was_there_and_the_phases_rebuild_the_pipelines_masks(profiled):
    saved = json.loads(profiled.read_text())
    assert saved["7b"] == {"rows": [1, 2]}
    profile = saved["profile_block_tiny"]
    assert [layer["name"].rsplit(".", 1)[-1] for layer in profile["layers"]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for layer in profile["layers"]:
        assert layer["same_mask_as_prune_layer"], layer["name"]
        assert layer["prune_layer"]["seconds"] > 0 and layer["frank_wolfe"]["per_iteration_seconds"] > 0
        assert all(phase["seconds"] > 0 for phase in layer["phases"].values()), layer["name"]
        assert layer["record"]["iterations"] <= profile["max_iter"]
    assert sum(profile["summary"]["shares"].values()) == pytest.approx(1.0)
    assert profile["peak_rss_gb"] > 0 and "history_seconds" in profile


def test_the_markdown_keeps_earlier_sections_and_the_profile_appears_once(profiled):
    text = profiled.with_suffix(".md").read_text()
    assert text.startswith(EARLIER.rstrip("\n"))
    assert text.count(profile_block.TITLES["tiny"]) == 1


def test_a_section_is_replaced_in_place_and_appended_when_absent():
    title = "## Profile"
    first = profile_block.with_section(EARLIER, title, f"{title}\n\nold\n")
    assert first.startswith(EARLIER) and first.endswith(f"{title}\n\nold\n")
    again = profile_block.with_section(first + "\n## Later\n\nkept\n", title, f"{title}\n\nnew\n")
    assert again.count(title) == 1 and "old" not in again and "new" in again
    assert again.startswith(EARLIER) and again.endswith("## Later\n\nkept\n")
    assert profile_block.with_section("", title, f"{title}\n") == f"{title}\n"


def test_keep_as_before_moves_the_saved_profile_into_the_before_columns(profiled, tmp_path):
    profile = json.loads(profiled.read_text())["profile_block_tiny"]
    results = tmp_path / "scale.json"
    results.write_text(json.dumps({"profile_block_tiny": profile}))
    newer = dict(profile, commit="newer", summary=dict(profile["summary"], total=profile["summary"]["total"] / 2))
    profile_block.write_results(newer, "tiny", results, keep_as_before=True)
    saved = json.loads(results.read_text())
    assert saved["profile_block_tiny"]["commit"] == "newer"
    assert saved["profile_block_tiny_before"]["commit"] == profile["commit"]
    text = results.with_suffix(".md").read_text()
    header = next(line for line in text.split("\n") if line.startswith("| phase |"))
    assert "before: seconds" in header and "before: share" in header
    block = next(line for line in text.split("\n") if line.startswith("| **block** |"))
    assert block.count("**100%**") == 2
    assert f"fw_jax {profile['commit']}" in text  # the 'before' profile is named
    with pytest.raises(SystemExit, match="no 'profile_block_tiny' profile"):
        profile_block.write_results(newer, "tiny", tmp_path / "empty.json", keep_as_before=True)
