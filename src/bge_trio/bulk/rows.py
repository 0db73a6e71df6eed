"""Reading a corpus: JSONL or Parquet rows with an id and a text.

The input is a :class:`~bge_trio.bulk.store.Location`: a local file or an object in
a store, read the same way. A file that cannot be read, or lacks a column, stops the
job with one line naming the file; a bad row (no id, a missing or empty text, a line
that is not JSON) is reported with its row number and skipped, so it never loses the
rest of the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import attrs

from bge_trio.bulk.store import Location


class InputError(ValueError):
    """The input cannot be read at all (one line, naming the file)."""


@attrs.frozen
class Columns:
    id: str = "id"
    text: str = "text"


@attrs.frozen
class Row:
    number: int  # 0-based position in the input
    id: Any
    text: str


@attrs.frozen
class BadRow:
    number: int
    id: Any
    reason: str


def input_format(path: Location) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise InputError(f"{path.uri}: unknown input format; use .jsonl or .parquet")


def count_rows(path: Location) -> int:
    """How many rows the input has (for progress and sharding)."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        try:
            with path.open_file() as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path.uri}: not a readable Parquet file ({exc})") from None
    try:
        return sum(1 for line in path.lines() if line.strip())
    except OSError as exc:
        raise InputError(f"{path.uri}: cannot read it ({exc.strerror or exc})") from None


def read_rows(path: Location, columns: Columns) -> Iterator[Row | BadRow]:
    """Every row in input order; JSONL blank lines are not rows."""
    if input_format(path) == "parquet":
        yield from _parquet_rows(path, columns)
    else:
        yield from _jsonl_rows(path, columns)


def check_row(number: int, record: Any, columns: Columns) -> Row | BadRow:
    if not isinstance(record, dict):
        return BadRow(number, None, "not a JSON object")
    row_id = record.get(columns.id)
    text = record.get(columns.text)
    if row_id is None:
        return BadRow(number, None, f"no '{columns.id}'")
    if not isinstance(text, str):
        return BadRow(number, row_id, f"'{columns.text}' is missing or not a string")
    if not text.strip():
        return BadRow(number, row_id, f"'{columns.text}' is empty")
    return Row(number, row_id, text)


def parse_line(number: int, line: str | bytes, columns: Columns) -> Row | BadRow:
    """One JSONL line as a row; a line that is not JSON is a bad row, not an error."""
    try:
        record = json.loads(line)
    except ValueError:
        return BadRow(number, None, "not valid JSON")
    return check_row(number, record, columns)


def _jsonl_rows(path: Location, columns: Columns) -> Iterator[Row | BadRow]:
    try:
        lines = path.lines()
    except OSError as exc:
        raise InputError(f"{path.uri}: cannot read it ({exc.strerror or exc})") from None
    number = 0
    for line in lines:
        if not line.strip():
            continue
        if number == 0:
            _check_first_line(path, line, columns)
        yield parse_line(number, line, columns)
        number += 1


def _check_first_line(path: Location, line: bytes, columns: Columns) -> None:
    """The first line names the columns: a file without them is refused whole."""
    try:
        record = json.loads(line)
    except ValueError:
        return  # a bad row, reported as such
    if isinstance(record, dict):
        _check_columns(path, record.keys(), columns)


def _parquet_rows(path: Location, columns: Columns) -> Iterator[Row | BadRow]:
    import pyarrow.parquet as pq

    try:
        f = path.open_file()
        parquet = pq.ParquetFile(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.uri}: not a readable Parquet file ({exc})") from None
    with f:
        _check_columns(path, parquet.schema_arrow.names, columns)
        number = 0
        for batch in parquet.iter_batches(columns=[columns.id, columns.text], batch_size=4096):
            for record in batch.to_pylist():
                yield check_row(number, record, columns)
                number += 1


IdType = Literal["int", "str"]


def id_type_of(rows: Iterable[Row | BadRow]) -> IdType:
    """Integers if the first good row's id is one, else strings: decided once per job."""
    first = next((row.id for row in rows if isinstance(row, Row)), "")
    return "int" if isinstance(first, int) and not isinstance(first, bool) else "str"


def typed(row: Row | BadRow, id_type: IdType) -> Row | BadRow:
    """The row with its id of the job's type: a string id made from another value, or a
    bad row where an integer was expected and something else came."""
    if isinstance(row, BadRow):
        if row.id is not None and not _fits(row.id, id_type):
            return attrs.evolve(row, id=str(row.id) if id_type == "str" else None)
        return row
    if _fits(row.id, id_type):
        return row
    if id_type == "str":
        return attrs.evolve(row, id=str(row.id))
    return BadRow(row.number, None, f"id {row.id!r} is not an integer like the first row's id")


def _fits(value: Any, id_type: IdType) -> bool:
    if id_type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_columns(path: Location, names: Any, columns: Columns) -> None:
    missing = [c for c in (columns.id, columns.text) if c not in set(names)]
    if missing:
        raise InputError(
            f"{path.uri}: no column {' or '.join(repr(c) for c in missing)} (it has: "
            f"{', '.join(sorted(map(str, names)))}); name them with --id-column / --text-column"
        )
