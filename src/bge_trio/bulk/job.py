"""``bge-trio embed``: a resumable job of shards and a manifest, run here or on Ray.

The input's rows are cut into shards of ``shard_rows`` (by position, so a rerun cuts
them the same way). Each shard is embedded and written whole as ``part-NNNNN.parquet``
(:mod:`bge_trio.bulk.parts`), and only then recorded in ``_manifest.json``
(:mod:`bge_trio.bulk.manifest`). An interrupted run leaves complete parts and a manifest
that names them; the next run with the same arguments skips them and redoes at most the
shards that were in progress, under the same names: no row is lost or written twice.

This module is the driver, the same for both ways of running: it reads the rows, skips
the shards done, hands the rest to a :class:`Runner` and records each part the runner
reports written. :class:`LocalRunner` overlaps three stages in three threads (reading and
tokenising the next shard, embedding this one, writing the last), so the model is not
idle while a shard is parsed or a part compressed; the Ray runner
(:mod:`bge_trio.bulk.on_ray`) spreads shards over actors.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TextIO

import attrs

from bge_trio.bulk.embedder import BulkEmbedder, Tokenized
from bge_trio.bulk.manifest import Manifest, fingerprint
from bge_trio.bulk.parts import PartWriter, Shard, ShardDone, describe, vector_settings
from bge_trio.bulk.progress import Progress
from bge_trio.bulk.rows import BadRow, Columns, IdType, Row, count_rows, id_type_of, read_rows
from bge_trio.bulk.store import Location
from bge_trio.config import Settings
from bge_trio.model.encoder import Output
from bge_trio.model.source import ModelSource

log = logging.getLogger("bge_trio.bulk")
SHOWN_BAD_ROWS = 20  # one log line each; the rest are counted (all are in the output)


@attrs.frozen
class Job:
    input: Location
    output: Location
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


class Runner(Protocol):
    """Embeds shards and writes their parts; yields each one written, in any order."""

    def describe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model (as the parts' metadata has it) and the memory plan."""
        ...

    def run(self, shards: Iterator[Shard]) -> Iterator[ShardDone]: ...


# Makes the runner once there is work left (loading a model, starting actors), given
# the output and the job's id type.
RunnerFactory = Callable[[Location, IdType], Runner]


def run_job(
    job: Job,
    settings: Settings,
    source: ModelSource,
    runner_for: RunnerFactory,
    stream: TextIO | None = None,
) -> Summary:
    started = time.monotonic()
    total = count_rows(job.input)
    manifest = Manifest.open(job.output, _identity(job, settings, source))
    done = manifest.done
    progress = Progress(total, done=sum(p["rows"] for p in done.values()), stream=stream)
    shards = (
        Shard(index, rows)
        for index, rows in enumerate(_cut(read_rows(job.input, job.columns), job.shard_rows))
    )
    pending = (shard for shard in shards if shard.name not in done)
    first = next(pending, None)
    if first is not None:
        id_type = manifest.id_type or id_type_of(read_rows(job.input, job.columns))
        runner = runner_for(job.output, id_type)
        manifest.started(id_type, *runner.describe())
        progress.begin()
        shown = 0
        for part in runner.run(itertools.chain([first], pending)):
            for row_id, number, reason in part.failed[: max(0, SHOWN_BAD_ROWS - shown)]:
                log.warning("row %d (id %r) skipped: %s", number, row_id, reason)
            shown += len(part.failed)
            manifest.record(part)
            progress.advance(part.rows, part.tokens)
    progress.finish()
    parts = done.values()
    failed = sum(p["failed"] for p in parts)
    if failed > SHOWN_BAD_ROWS:
        log.warning("%d rows in all have no vectors; their 'error' column says why", failed)
    return Summary(
        rows=sum(p["rows"] for p in parts),
        embedded=sum(p["rows"] - p["failed"] for p in parts),
        failed=failed,
        tokens=sum(p["tokens"] for p in parts),
        seconds=time.monotonic() - started,
        parts=len(done),
    )


def run_local(
    job: Job, settings: Settings, source: ModelSource, stream: TextIO | None = None
) -> Summary:
    def runner_for(output: Location, id_type: IdType) -> Runner:
        return LocalRunner(BulkEmbedder(settings, source, job.outputs), settings, output, id_type)

    return run_job(job, settings, source, runner_for, stream)


class LocalRunner:
    """Three stages in three threads: read and tokenise shard n+1, embed shard n (the
    model's threads), write part n-1. One shard waits between stages at most, so memory
    holds three shards, not the corpus."""

    def __init__(
        self, embedder: BulkEmbedder, settings: Settings, output: Location, id_type: IdType
    ) -> None:
        self._described = describe(embedder, settings)
        self._writer = PartWriter(embedder, output, id_type, self._described[0])

    def describe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._described

    def run(self, shards: Iterator[Shard]) -> Iterator[ShardDone]:
        writer = self._writer
        with (
            ThreadPoolExecutor(1, thread_name_prefix="bulk-read") as reading,
            ThreadPoolExecutor(1, thread_name_prefix="bulk-write") as writing,
        ):

            def read_next() -> tuple[Shard, Tokenized] | None:
                shard = next(shards, None)  # the rows are read in this thread too
                return None if shard is None else writer.tokenize(shard)

            ahead = reading.submit(read_next)
            written: Future[ShardDone] | None = None
            while (tokenized := ahead.result()) is not None:
                ahead = reading.submit(read_next)
                embedded = writer.embed(tokenized)
                if written is not None:
                    yield written.result()
                written = writing.submit(writer.write, embedded)
            if written is not None:
                yield written.result()


def _cut(rows: Iterator[Row | BadRow], size: int) -> Iterator[list[Row | BadRow]]:
    while shard := list(itertools.islice(rows, size)):
        yield shard


def _identity(job: Job, settings: Settings, source: ModelSource) -> dict[str, Any]:
    """What a rerun must share with the run before to resume it."""
    return {
        "input": job.input.uri,
        "input_fingerprint": fingerprint(job.input),
        "columns": attrs.asdict(job.columns),
        "outputs": sorted(job.outputs),
        "shard_rows": job.shard_rows,
        "model_path": str(source.path),
        "settings": vector_settings(settings),
    }
