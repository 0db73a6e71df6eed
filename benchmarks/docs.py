"""Where benchmarks publish: data and plots in docs/results/, tables in the prose.

A benchmark saves its report as ``docs/results/NAME.json`` (for comparing runs) and its
plots beside it, and generates its tables from that JSON into the documents that show
them, between two markers: ``<!-- NAME: written by ... -->`` opens a block and
``<!-- /NAME -->`` closes it. Each table is written once, there, and never edited by hand
(a test regenerates every block from its JSON and compares).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIB = 1 << 20
DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "results"


def result_path(name: str, suffix: str = ".json") -> Path:
    """``docs/results/NAME.json`` (or another suffix: ``.png`` for a plot)."""
    return RESULTS / f"{name}{suffix}"


def save_result(name: str, report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path(name).write_text(json.dumps(report, indent=2) + "\n")


def load_result(name: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result_path(name).read_text())
    return report


def block(doc: str, name: str) -> tuple[int, int]:
    """Where the generated block ``name`` starts and ends in ``doc``."""
    start = doc.index("\n", doc.index(f"<!-- {name}:")) + 1
    return start, doc.index(f"<!-- /{name} -->")


def write_block(document: str, name: str, text: str) -> None:
    """Replace the generated block ``name`` of ``docs/DOCUMENT`` with ``text``."""
    path = DOCS / document
    doc = path.read_text()
    start, end = block(doc, name)
    path.write_text(doc[:start] + text + doc[end:])


def markdown_table(caption: str, header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A caption, then a markdown table of ``header`` and ``rows``, then a blank line."""
    lines = [caption, "", f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}"]
    return [*lines, *(f"| {' | '.join(row)} |" for row in rows), ""]


def mib(value: float) -> str:
    """Bytes as MiB with one decimal, the tables' unit for memory."""
    return f"{value / MIB:.1f}"
