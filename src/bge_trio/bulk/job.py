"""``bge-trio embed`` on one machine: a resumable job of shards and a manifest.

The input's rows are cut into shards of ``shard_rows`` (by position, so a rerun cuts
them the same way). Each shard is embedded, written to ``part-NNNNN.parquet`` under a
temporary name and renamed (a part file is whole or absent), and only then recorded
in ``_manifest.json`` (also replaced atomically). Readers of the directory as a
Parquet dataset (pyarrow, pandas, Spark, DuckDB) skip both names. An interrupted run leaves complete
parts and a manifest that names them; the next run with the same arguments skips
them and redoes at most the one shard that was in progress, writing it under the
same name: no row is lost or written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs
import pyarrow.parquet as pq

from bge_trio.bulk import records
from bge_trio.bulk.embedder import BulkEmbedder
from bge_trio.bulk.progress import Progress
from bge_trio.bulk.rows import (
    BadRow,
    Columns,
    InputError,
    Row,
    count_rows,
    id_type_of,
    read_rows,
    typed,
)
from bge_trio.config import Settings
from bge_trio.model.encoder import Output
from bge_trio.model.source import ModelSource

log = logging.getLogger("bge_trio.bulk")
MANIFEST = "_manifest.json"  # "_" and "." names are skipped by Parquet dataset readers
SHOWN_BAD_ROWS = 20  # one log line each; the rest are counted (all are in the output)


@attrs.frozen
class Job:
    input: Path
    output: Path
    columns: Columns
    outputs: frozenset[Output]
    shard_rows: int = 1000


@attrs.frozen
class Summary:
    rows: int
    embedded: int
    failed: int
    tokens: int
    seconds: float
    parts: int


def run_local(
    job: Job, settings: Settings, source: ModelSource, stream: TextIO | None = None
) -> Summary:
    started = time.monotonic()
    total = count_rows(job.input)
    manifest = _manifest(job, settings, source)
    done: dict[str, Any] = manifest["done"]
    progress = Progress(total, done=sum(p["rows"] for p in done.values()), stream=stream)
    embedder: BulkEmbedder | None = None  # loaded only when there is work left
    shown = 0
    for index, shard in enumerate(_shards(read_rows(job.input, job.columns), job.shard_rows)):
        name = f"part-{index:05d}.parquet"
        if name in done:
            continue
        if embedder is None:
            embedder = BulkEmbedder(settings, source, job.outputs)
            progress.begin()
            manifest["model"] = records.describe(
                embedder.encoder.info.name, _model_info(embedder), job.outputs, _settings(settings)
            )
            manifest["memory"] = _memory(embedder)  # of the run that last embedded
        rows, tokens, failed = _embed_shard(embedder, shard, manifest, job.output / name)
        for row_id, number, reason in failed[: max(0, SHOWN_BAD_ROWS - shown)]:
            log.warning("row %d (id %r) skipped: %s", number, row_id, reason)
        shown += len(failed)
        done[name] = {"rows": rows, "failed": len(failed), "tokens": tokens}
        _write_json(job.output / MANIFEST, manifest)
        progress.advance(rows, tokens)
    progress.finish()
    parts = done.values()
    failed_total = sum(p["failed"] for p in parts)
    if failed_total > SHOWN_BAD_ROWS:
        log.warning("%d rows in all have no vectors; their 'error' column says why", failed_total)
    return Summary(
        rows=sum(p["rows"] for p in parts),
        embedded=sum(p["rows"] - p["failed"] for p in parts),
        failed=failed_total,
        tokens=sum(p["tokens"] for p in parts),
        seconds=time.monotonic() - started,
        parts=len(done),
    )


def _embed_shard(
    embedder: BulkEmbedder, shard: list[Row | BadRow], manifest: dict[str, Any], path: Path
) -> tuple[int, int, list[tuple[Any, int, str]]]:
    """Embed one shard and write its part file; (rows, tokens, failed rows)."""
    id_type = manifest.setdefault("id_type", id_type_of(shard))
    checked = [typed(row, id_type) for row in shard]
    result = embedder.embed_rows(checked)
    errors = [result.errors.get(i) for i in range(len(checked))]
    failed = [
        (row.id, row.number, error)
        for row, error in zip(checked, errors, strict=True)
        if error is not None
    ]
    ids, embeddings, tokens = [row.id for row in checked], result.embeddings, result.tokens
    target = records.schema(records.arrow_id_type(id_type), embedder.outputs, manifest["model"])
    _write_parquet(path, records.table(ids, embeddings, tokens, errors, target))
    return len(shard), sum(tokens), failed


def _shards(rows: Iterator[Row | BadRow], size: int) -> Iterator[list[Row | BadRow]]:
    shard: list[Row | BadRow] = []
    for row in rows:
        shard.append(row)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _manifest(job: Job, settings: Settings, source: ModelSource) -> dict[str, Any]:
    """The output directory's manifest: new, or an earlier run of the same job to resume."""
    identity = {
        "input": str(job.input.resolve()),
        "input_fingerprint": _fingerprint(job.input),
        "columns": attrs.asdict(job.columns),
        "outputs": sorted(job.outputs),
        "shard_rows": job.shard_rows,
        "model_path": str(source.path),
        "settings": _settings(settings),
    }
    path = job.output / MANIFEST
    if path.exists():
        try:
            manifest: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable manifest ({exc})") from None
        differs = [key for key, value in identity.items() if manifest.get(key) != value]
        if differs:
            raise InputError(
                f"{job.output} holds another job (its {', '.join(differs)} differ); "
                "use a new output directory to start over"
            )
        return manifest
    if job.output.exists() and any(job.output.iterdir()):
        raise InputError(f"{job.output} is not empty and has no {MANIFEST}; use a new directory")
    job.output.mkdir(parents=True, exist_ok=True)
    manifest = {**identity, "done": {}}
    _write_json(path, manifest)
    return manifest


def _settings(settings: Settings) -> dict[str, Any]:
    """The settings that change what the vectors are."""
    return {
        "dtype": settings.dtype,
        "max_seq_length": settings.max_seq_length,
        "long_input": settings.long_input,
        "chunk_window": settings.chunk_window,
        "chunk_overlap": settings.chunk_overlap,
    }


def _model_info(embedder: BulkEmbedder) -> dict[str, Any]:
    info = embedder.encoder.info
    return {
        "dimension": info.dimension,
        "dtype": info.dtype,
        "max_seq_length": info.max_seq_length,
        "pooling": info.pooling,
    }


def _memory(embedder: BulkEmbedder) -> dict[str, Any]:
    """The memory plan the embedder ran with: the server's, for the same settings."""
    plan = embedder.memory
    return {
        "probe_status": plan.status,
        "cost_a_bytes_per_token": plan.cost.a,
        "cost_b_bytes_per_token2": plan.cost.b,
        "cost_c_bytes_per_pass": plan.cost.c,
        "per_forward_budget_bytes": plan.budget.workspace_bytes,
    }


def _fingerprint(path: Path) -> str:
    """Size and a hash of the first and last MiB: a changed input is noticed cheaply."""
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return digest.hexdigest()[:32]


def _write_parquet(path: Path, table: Any) -> None:
    partial = path.with_name("." + path.name + ".partial")
    pq.write_table(table, partial)
    _replace(partial, path)


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name("." + path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str))
    _replace(partial, path)


def _replace(partial: Path, path: Path) -> None:
    with partial.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
