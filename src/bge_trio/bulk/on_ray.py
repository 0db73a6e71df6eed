"""``bge-trio embed --ray``: the same job on Ray Data.

read (JSONL as lines of text, or Parquet) → ``map_batches`` with one
:class:`EmbedActor` per worker → ``write_parquet``. JSONL is read as text and each line
parsed in the actor, as the local job parses it: Ray Data's JSON reader stops the whole
job at the first line that is not JSON, where a bad line must be one row with its
error. The driver reads the input's first rows itself, so a file that lacks a column
is refused in one line before the cluster does any work, and the id type is decided
once for every actor. Each actor builds a :class:`~bge_trio.bulk.embedder.BulkEmbedder`,
so it loads the model once, sizes its memory budget from the container or node it
runs in (``processes`` = actors per node share that memory) and plans passes with
the server's planner. A killed actor is restarted and its batch retried by Ray
(``max_restarts``, ``max_task_retries``); the write happens after, so every row is
written once.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import attrs

from bge_trio.bulk import records
from bge_trio.bulk.rows import (
    BadRow,
    Columns,
    IdType,
    Row,
    check_row,
    id_type_of,
    input_format,
    parse_line,
    read_rows,
    typed,
)
from bge_trio.config import PREFIX, Settings
from bge_trio.model.encoder import Output
from bge_trio.model.source import resolve_model

log = logging.getLogger("bge_trio.bulk")
# Reading and writing are light next to the actors' forward passes; asking a whole CPU
# for them would leave them none on a small cluster whose CPUs the actors hold.
IO_CPUS = 0.1
ACTOR_CPU_SHARE = 0.8
LINE = "text"  # the column Ray Data's text reader puts each line in


@attrs.frozen
class RayJob:
    input: Path
    output: Path
    columns: Columns
    outputs: frozenset[Output]
    address: str  # "auto", "local" (start one here) or host:port
    actors: int | None = None  # None: from the cluster's CPUs
    threads_per_actor: int = 1
    batch_rows: int = 256
    id_type: IdType = "str"  # decided by the driver from the first good row


class EmbedActor:
    """One model per actor; ``__call__`` embeds a batch of rows (a pyarrow table)."""

    def __init__(self, env: dict[str, str], model: str, job: RayJob, processes: int) -> None:
        env = {**env, PREFIX + "PROCESSES": str(processes)}
        settings = Settings.from_env(env)
        from bge_trio.bulk.embedder import BulkEmbedder

        self._embedder = BulkEmbedder(
            settings, resolve_model(model), job.outputs, threads=job.threads_per_actor
        )
        info = self._embedder.encoder.info
        self._job = job
        self._metadata = records.describe(
            info.name,
            {"dimension": info.dimension, "dtype": info.dtype},
            job.outputs,
            {"long_input": settings.long_input},
        )

    def __call__(self, batch: Any) -> Any:
        job = self._job
        checked = [typed(row, job.id_type) for row in _rows(batch, job)]
        result = self._embedder.embed_rows(checked)
        errors = [result.errors.get(i) for i in range(len(checked))]
        target = records.schema(records.arrow_id_type(job.id_type), job.outputs, self._metadata)
        ids = [row.id for row in checked]
        return records.table(ids, result.embeddings, result.tokens, errors, target)


def _rows(batch: Any, job: RayJob) -> list[Row | BadRow]:
    """A batch's rows: JSONL lines parsed here, or Parquet's two columns."""
    columns = job.columns
    if input_format(job.input) == "jsonl":
        lines = [line for line in batch.column(LINE).to_pylist() if line.strip()]
        return [parse_line(i, line, columns) for i, line in enumerate(lines)]
    ids = batch.column(columns.id).to_pylist()
    texts = batch.column(columns.text).to_pylist()
    return [
        check_row(i, {columns.id: row_id, columns.text: text}, columns)
        for i, (row_id, text) in enumerate(zip(ids, texts, strict=True))
    ]


def run_on_ray(job: RayJob, model: str) -> int:
    """Run the job on the cluster at ``job.address``; returns the rows written."""
    import ray

    # checks the columns (InputError) and decides the id type, before the cluster works
    job = attrs.evolve(job, id_type=id_type_of(read_rows(job.input, job.columns)))

    if not ray.is_initialized():
        ray.init(
            address=None if job.address == "local" else job.address,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    cpus = float(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
    alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    nodes = max(1, len(alive))
    actors = job.actors or max(1, int(cpus // job.threads_per_actor))
    light = {"num_cpus": IO_CPUS}
    if input_format(job.input) == "parquet":
        dataset = ray.data.read_parquet(str(job.input), ray_remote_args=light)
    else:  # blank lines are not rows, as in the local job
        dataset = ray.data.read_text(str(job.input), drop_empty_lines=True, ray_remote_args=light)
    env = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    embedded = dataset.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "env": env,
            "model": model,
            "job": job,
            "processes": math.ceil(actors / nodes),
        },
        batch_size=job.batch_rows,
        batch_format="pyarrow",
        concurrency=actors,
        num_cpus=ACTOR_CPU_SHARE * job.threads_per_actor,
        max_restarts=-1,
        max_task_retries=-1,
    )
    embedded.write_parquet(str(job.output), ray_remote_args=light)
    import pyarrow.parquet as pq

    return int(pq.ParquetDataset(str(job.output)).read(columns=["id"]).num_rows)
