"""Generated tables in the docs: each lives between two markers and is rewritten whole.

``<!-- NAME: written by ... -->`` opens a block and ``<!-- /NAME -->`` closes it; what is
between is the benchmark's table, generated from its JSON, never edited by hand (a test
regenerates every block from its JSON and compares).
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def block(doc: str, name: str) -> tuple[int, int]:
    """Where the generated block ``name`` starts and ends in ``doc``."""
    start = doc.index("\n", doc.index(f"<!-- {name}:")) + 1
    return start, doc.index(f"<!-- /{name} -->")


def write_block(path: Path, name: str, text: str) -> None:
    """Replace the generated block ``name`` of the document at ``path`` with ``text``."""
    doc = path.read_text()
    start, end = block(doc, name)
    path.write_text(doc[:start] + text + doc[end:])
