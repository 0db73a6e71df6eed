"""The numbers in the docs' tables are the ones their data files generate.

Each benchmark writes a JSON file and generates its tables from it, into a table file and
between markers in a document. Regenerating every table from its JSON must give the text
that is there: a table edited by hand, or a JSON changed without its tables, fails.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from benchmarks.docs import DOCS, block

# block name: (document, data file, module whose ``table`` generates it, table file)
GENERATED: dict[str, tuple[str | None, str, str, str]] = {
    "performance-table": ("performance.md", "performance.json", "load", "performance-table.md"),
    "fairness-table": ("performance.md", "fairness.json", "fairness", "fairness-table.md"),
    "batching-table": ("performance.md", "batching.json", "batching", "batching-table.md"),
    "compact-table": ("performance.md", "compact.json", "compact", "compact-table.md"),
    "memory-form-table": ("memory-model.md", "memory-form.json", "form", "memory-form-table.md"),
    "memory-m3-table": ("memory-model.md", "memory-m3.json", "m3", "memory-m3-table.md"),
    "bulk-table": ("scale-out.md", "bulk.json", "bulk", "bulk-table.md"),
    "rerank-table": ("performance.md", "rerank.json", "rerank", "rerank-table.md"),
    "shutdown-table": (None, "shutdown.json", "shutdown", "shutdown-table.md"),  # linked, not shown
}


def _generate(module: str, data: str) -> str:
    table: Callable[[dict[str, Any]], str] = importlib.import_module(f"benchmarks.{module}").table
    return table(json.loads((DOCS / data).read_text()))


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_every_generated_table_is_what_its_data_file_generates(name: str) -> None:
    document, data, module, table_file = GENERATED[name]
    expected = _generate(module, data)
    assert (DOCS / table_file).read_text() == expected, f"{table_file} differs from {data}"
    if document is not None:
        doc = (DOCS / document).read_text()
        start, end = block(doc, name)
        assert doc[start:end] == expected, f"{document}: {name} differs from {data}"


def test_every_generated_block_in_the_docs_is_checked() -> None:
    found = {
        match.group(1)
        for path in DOCS.glob("*.md")
        for match in re.finditer(r"<!-- ([a-z0-9-]+): written by", path.read_text())
    }
    assert found == {name for name, (document, *_) in GENERATED.items() if document}
