"""The documentation: the site builds offline with warnings as errors, every public name has an
entry in the API reference, every Python example in the README and docs/ runs, and the README
stays a short front page.

A Python example that cannot run here (it needs the real checkpoint, or takes minutes) is marked
by an HTML comment on the line just before its fence, invisible on the page:

    <!-- docs-test: skip (why) -->

Run alone: ``python -m pytest tests/test_docs.py -q`` (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10_240  # bytes: the README is a front page, the manual is the site
PUBLIC_MODULES = ("fw_jax", "fw_jax.solver", "fw_jax.models", "fw_jax.pipeline")
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
# A commit hash: a word of 7 to 40 hex characters with at least one digit and one letter (so
# neither a number like 6410773 nor a word like "defaced" counts).
HEX_WORD = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|(?<![\w&])#\d+\b", re.IGNORECASE)


def user_pages() -> list[pathlib.Path]:
    """The README and the pages written for users (not the maths, not the results files)."""
    return [README, DOCS / "index.md", DOCS / "getting-started.md", *sorted((DOCS / "guide").glob("*.md")),
            DOCS / "results" / "index.md"]


def python_examples(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every fenced ``python`` block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: a code fence is never closed")
        i += 1
        if fence.group(1) == "python":
            before = lines[start - 1] if start else ""
            skip = SKIP_MARK.search(before)
            blocks.append((start + 1, "\n".join(body) + "\n", skip.group(1) if skip else None))
    return blocks


def files_with_examples() -> list[pathlib.Path]:
    return [p for p in [README, *sorted(DOCS.rglob("*.md"))] if python_examples(p)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    """The site, built from this checkout as CI builds it: offline, warnings are errors."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    try:
        done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as error:  # pragma: no cover
        pytest.fail(f"cannot run mkdocs ({error}); install the docs extra: pip install -e '.[docs]'")
    if done.returncode != 0:
        pytest.fail("mkdocs build --strict failed (install the docs extra: pip install -e '.[docs]'):\n"
                    + done.stdout[-4000:] + done.stderr[-8000:])
    return out


def test_site_builds_offline_with_warnings_as_errors(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in index, "the theme must not fetch fonts: set theme.font: false"
    assert (site / "results" / "quality" / "index.html").is_file()
    for result in sorted((ROOT / "results").glob("*.md")):
        assert (site / "results" / result.stem / "index.html").is_file(), f"{result} has no page"


def test_every_public_name_has_an_api_entry(site):
    ids = set()
    for page in (site / "api").rglob("index.html"):
        ids |= set(re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8")))
    top = importlib.import_module("fw_jax")
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            documented = f"{module_name}.{name}" in ids or (
                name in top.__all__ and getattr(top, name) is getattr(module, name) and f"fw_jax.{name}" in ids)
            if not documented:
                missing.append(f"{module_name}.{name}")
    assert not missing, ("public names without an entry in docs/api/*.md (add `::: module.name` in the "
                         f"right section): {missing}")


def test_cli_reference_has_every_command(site):
    from fw_jax.cli import build_parser

    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    (commands,) = [a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
    for name in commands.choices:
        assert f"fw-jax {name}" in page, f"the command-line reference has no section for fw-jax {name}"


def test_examples_are_found_and_skips_are_few():
    files = files_with_examples()
    assert README in files and DOCS / "guide" / "solver.md" in files
    blocks = [b for f in files for b in python_examples(f)]
    skipped = [b for b in blocks if b[2]]
    assert len(blocks) >= 8
    assert len(skipped) <= 3, f"keep the examples runnable: {len(skipped)} are skipped"


@pytest.fixture(scope="module")
def example_reports(tmp_path_factory) -> dict[str, dict]:
    """Run every file's examples in one fresh process (JAX's default float32, as a user has it;
    one process, so files that solve the same shapes share compilations), in an empty folder."""
    files = files_with_examples()
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__)), *map(str, files)],
                          cwd=tmp_path_factory.mktemp("examples"), capture_output=True, text=True, timeout=900)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"file"')]
    if len(reports) != len(files):
        pytest.fail("the example runner stopped:\n" + done.stdout[-4000:] + done.stderr[-8000:])
    return {r["file"]: r for r in reports}


@pytest.mark.parametrize("path", files_with_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path, example_reports):
    """Each file's examples run in order, in one namespace of their own."""
    report = example_reports[str(path)]
    assert report["error"] is None, report["error"]
    assert report["ran"] == sum(1 for b in python_examples(path) if not b[2])


def test_readme_is_a_short_front_page():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} and move detail to docs/"


@pytest.mark.parametrize("path", user_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_user_pages_hold_no_commit_hashes_or_issue_numbers(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets may be anything
    assert not HEX_WORD.findall(text), f"{path.name}: commit hashes {HEX_WORD.findall(text)}"
    assert not ISSUE_NUMBER.findall(text), f"{path.name}: issue numbers {ISSUE_NUMBER.findall(text)}"


def test_readme_results_are_copied_from_the_quality_table():
    readme = README.read_text(encoding="utf-8")
    quality = (ROOT / "results" / "quality.md").read_text(encoding="utf-8")
    cells = re.findall(r"\|\s*(\d+\.\d / \d+\.\d)\s*(?=\|)", readme)
    assert len(cells) >= 20
    assert not [c for c in cells if f"| {c} |" not in quality], "README numbers not in results/quality.md"


def run_examples(path: pathlib.Path) -> dict:
    """Run the unskipped Python examples of one Markdown file in order, in a namespace of their
    own; stop at the first that fails."""
    namespace = {"__name__": "__docs_example__"}
    ran = 0
    for line, code, skip in python_examples(path):
        if skip:
            continue
        try:
            exec(compile(code, f"{path}, the example at line {line}", "exec"), namespace)
        except BaseException:
            return {"file": str(path), "ran": ran, "error": f"the example at {path}:{line} failed:\n"
                    + traceback.format_exc()}
        ran += 1
    return {"file": str(path), "ran": ran, "error": None}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(run_examples(pathlib.Path(arg))), flush=True)
