"""MkDocs hooks for fw_jax's site (named in mkdocs.yml; not a page).

- Every ``results/*.md`` (and its figures) becomes a page under ``results/`` as it is in the
  repository: the benchmarks write those files, so the site shows them, commands and dates
  included, without a copy that could drift.
- ``cli.md`` is generated from ``fw-jax``'s own argument parser, so the command-line reference
  and ``fw-jax CMD --help`` say the same thing.
- The docstrings' cross-reference roles (``:func:`solve_layer```, written for readers of the
  source) render as plain code names instead of as literal role markup.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re

import griffe
from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
RESULT_SUFFIXES = (".md", ".png", ".svg")
HELP_COLUMNS = "80"  # argparse wraps help to $COLUMNS; fixed, so the page does not depend on the terminal


ROLE = re.compile(r":(?:py:)?(?:func|class|data|attr|meth|mod|obj|exc):`~?([^`]+)`")


class RolesAsCode(griffe.Extension):
    """A griffe extension (named in mkdocs.yml): ``:func:`name``` → ```name``` in every
    docstring, before it is parsed (so ``Returns: A :class:`X` ...`` is not read as ``name: text``)."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)


def on_files(files: Files, config) -> Files:
    """Add the results files and the generated command-line reference to the site."""
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in RESULT_SUFFIXES and path.is_file():
            uri = f"results/{path.name}"
            if files.get_file_from_path(uri) is not None:
                raise ValueError(f"docs/{uri} would hide {path}: the results pages come from results/ itself")
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    return files


def cli_reference() -> str:
    """The ``fw-jax`` command's reference page: every command's ``--help``, as printed."""
    from fw_jax.cli import build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parts = [
            "# Command-line reference",
            "",
            "Generated from `fw-jax`'s own parser when the site is built, so it is what "
            "`fw-jax --help` and `fw-jax COMMAND --help` print.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, sub in commands.choices.items():
            parts += ["", f"## `fw-jax {name}`", "", "```text", sub.format_help().rstrip(), "```"]
        return "\n".join(parts) + "\n"
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
