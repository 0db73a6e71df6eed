"""One shard of rows → one part file: the unit a job embeds, writes and resumes by.

The same steps whether a local job or a Ray actor runs them: rows typed to the job's id
type, embedded by a :class:`~bge_trio.bulk.embedder.BulkEmbedder`, written whole (or not
at all) as ``part-NNNNN.parquet``. The part's name depends only on the shard's position
in the input, so a shard done twice (a retried task, a rerun after a crash) is the same
file written twice, never two files.
"""

from __future__ import annotations

import io
from typing import Any

import attrs
import pyarrow.parquet as pq

from bge_trio.bulk import records
from bge_trio.bulk.embedder import BulkEmbedder, Rows, Tokenized
from bge_trio.bulk.rows import BadRow, IdType, Row, typed
from bge_trio.bulk.store import Location
from bge_trio.config import Settings

Failed = tuple[Any, int, str]  # id, row number, reason


@attrs.frozen
class Shard:
    index: int
    rows: list[Row | BadRow]

    @property
    def name(self) -> str:
        return part_name(self.index)


@attrs.frozen
class ShardDone:
    """What the manifest records of a written part, and the rows that failed (to log)."""

    name: str
    rows: int
    tokens: int
    failed: list[Failed]


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@attrs.frozen
class PartWriter:
    """Embeds shards and writes them as parts under ``output``."""

    embedder: BulkEmbedder
    output: Location
    id_type: IdType
    metadata: dict[str, Any]  # the schema's ``bge_trio`` key

    def tokenize(self, shard: Shard) -> tuple[Shard, Tokenized]:
        """The shard with its ids of the job's type, and its texts tokenised."""
        typed_shard = attrs.evolve(shard, rows=[typed(row, self.id_type) for row in shard.rows])
        return typed_shard, self.embedder.tokenize_rows(typed_shard.rows)

    def embed(self, tokenized: tuple[Shard, Tokenized]) -> tuple[Shard, Rows]:
        shard, tokens = tokenized
        return shard, self.embedder.finish(tokens)

    def write(self, embedded: tuple[Shard, Rows]) -> ShardDone:
        shard, result = embedded
        rows = shard.rows
        errors = [result.errors.get(i) for i in range(len(rows))]
        target = records.schema(
            records.arrow_id_type(self.id_type), self.embedder.outputs, self.metadata
        )
        table = records.table(
            [r.id for r in rows], result.embeddings, result.tokens, errors, target
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.output.child(shard.name).write_whole(buffer.getvalue())
        failed = [
            (row.id, row.number, error)
            for row, error in zip(rows, errors, strict=True)
            if error is not None
        ]
        return ShardDone(shard.name, len(rows), sum(result.tokens), failed)

    def run(self, shard: Shard) -> ShardDone:
        return self.write(self.embed(self.tokenize(shard)))


def describe(embedder: BulkEmbedder, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model as a part's metadata records it, and the memory plan it ran with."""
    info = embedder.encoder.info
    model = records.describe(
        info.name,
        {
            "dimension": info.dimension,
            "dtype": info.dtype,
            "backend": info.backend,
            "max_seq_length": info.max_seq_length,
            "pooling": info.pooling,
        },
        embedder.outputs,
        vector_settings(settings),
    )
    plan = embedder.memory
    memory = {
        "probe_status": plan.status,
        "cost_a_bytes_per_token": plan.cost.a,
        "cost_b_bytes_per_token2": plan.cost.b,
        "cost_c_bytes_per_pass": plan.cost.c,
        "per_forward_budget_bytes": plan.budget.workspace_bytes,
    }
    return model, memory


def vector_settings(settings: Settings) -> dict[str, Any]:
    """The settings that change what the vectors are."""
    return {
        "dtype": settings.dtype,
        "max_seq_length": settings.max_seq_length,
        "long_input": settings.long_input,
        "chunk_window": settings.chunk_window,
        "chunk_overlap": settings.chunk_overlap,
    }
