"""The numbers in the docs' tables are the ones their data files generate.

Each benchmark writes a JSON file in docs/results/ and generates its tables from it,
between markers in the document that shows them (each table once). Regenerating every
table from its JSON must give the text that is there: a table edited by hand, or a JSON
changed without its tables, fails.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from benchmarks.docs import DOCS, RESULTS, block, load_result

# block name: (document, data file in docs/results, the benchmarks.reports module whose
# ``table`` generates it)
GENERATED: dict[str, tuple[str, str, str]] = {
    "performance-table": ("performance.md", "performance", "load"),
    "fairness-table": ("performance.md", "fairness", "fairness"),
    "batching-table": ("performance.md", "batching", "batching"),
    "compact-table": ("performance.md", "compact", "compact"),
    "memory-form-table": ("memory-model.md", "memory-form", "form"),
    "memory-m3-table": ("memory-model.md", "memory-m3", "m3"),
    "bulk-table": ("scale-out.md", "bulk", "bulk"),
    "rerank-table": ("performance.md", "rerank", "rerank"),
    "backends-table": ("performance.md", "backends", "backends"),
    "shutdown-table": ("operations.md", "shutdown", "shutdown"),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_every_generated_table_is_what_its_data_file_generates(name: str) -> None:
    document, data, module = GENERATED[name]
    table: Callable[[dict[str, Any]], str] = importlib.import_module(
        f"benchmarks.reports.{module}"
    ).table
    doc = (DOCS / document).read_text()
    start, end = block(doc, name)
    assert doc[start:end] == table(load_result(data)), f"{document}: {name} differs from {data}"


def test_every_generated_block_in_the_docs_is_checked() -> None:
    found = {
        match.group(1)
        for path in DOCS.glob("*.md")
        for match in re.finditer(r"<!-- ([a-z0-9-]+): written by", path.read_text())
    }
    assert found == set(GENERATED)


def test_docs_holds_prose_and_results_holds_the_data() -> None:
    """docs/ is prose; every data file and plot is in docs/results/, and every one of
    them is linked from the prose (or generates a table there)."""
    assert {path.suffix for path in DOCS.iterdir() if path.is_file()} == {".md"}
    prose = "".join(path.read_text() for path in DOCS.glob("*.md"))
    linked = set(re.findall(r"\]\(results/([a-z0-9.-]+)\)", prose))
    assert linked <= {path.name for path in RESULTS.iterdir()}
    for path in RESULTS.iterdir():
        assert path.name in linked, f"{path.name} is linked from no document"
