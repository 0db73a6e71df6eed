"""Bulk embedding throughput: ``bge-trio embed`` alone, on Ray, and the server under load.

    python -m benchmarks.bulk [--seconds 20] [--standin-texts 24]

On the load corpus (``benchmarks/corpus.jsonl``, 320 texts, repeated ``--repeat`` times
with distinct ids), bundled all-MiniLM-L6-v2, fp32, probe cache warm (a first run fills
it):

- the single-process job (``bge-trio embed``, every core), wall time from the command's
  start (model load included) and tokens/s over it; the same command on one text gives
  its start-up, and the steady rate is tokens / (wall - start-up);
- the same job on Ray actors, a local cluster of this machine's CPUs, 2 actors x 1 thread
  (``--ray local``): wall time including the cluster's start;
- the server (``bge-trio serve``) driven by the load harness (4 clients x 32 texts) for
  ``--seconds``: tokens/s of the answered requests.

Then a sample of the corpus through the single-process job on the full-size BGE-M3
stand-in (random weights; ``max_seq`` 512 so its probe is short). Writes
``docs/results/bulk.json`` and its table into ``docs/scale-out.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import trio

from benchmarks.docs import load_result, save_result
from benchmarks.harness import CORPUS, Server, cpu_name, drive, load_corpus, m3_standin
from benchmarks.reports.bulk import table, write_tables
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported


def embed(source: Path, out: Path, model: str, *extra: str, **env: str) -> dict[str, Any]:
    """One ``bge-trio embed`` run: wall seconds, rows, tokens."""
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bge_trio.cli",
            "embed",
            str(source),
            str(out),
            "--model",
            model,
            *extra,
        ],
        env={**os.environ, "BGE_TRIO_LOG_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled", **env},
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    table = pq.ParquetDataset(str(out)).read(columns=["id", "tokens"])
    tokens = sum(table.column("tokens").to_pylist())
    return {
        "seconds": seconds,
        "rows": table.num_rows,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--standin-texts", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus embedded")
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the tables from bulk.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("bulk"))
        return
    work = Path(tempfile.mkdtemp(prefix="bge-trio-bulk-"))
    # fp32, as the server below and as the table says (auto would serve bf16 where native)
    cache = {"BGE_TRIO_CACHE_DIR": str(work / "cache"), "BGE_TRIO_DTYPE": "fp32"}
    corpus = work / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({**row, "id": f"{row['id']}-{copy}"}) + "\n"
            for copy in range(args.repeat)
            for row in load_corpus()
        )
    )
    embed(CORPUS, work / "warm", "bundled", **cache)  # fills the probe cache
    one = work / "one.jsonl"
    one.write_text(CORPUS.read_text().splitlines(keepends=True)[0])
    ray_args = ("--ray", "local", "--actors", "2", "--threads-per-actor", "1")
    local = embed(corpus, work / "local", "bundled", **cache)
    local_start = embed(one, work / "local-one", "bundled", **cache)["seconds"]
    on_ray = embed(corpus, work / "ray", "bundled", *ray_args, **cache)
    ray_start = embed(one, work / "ray-one", "bundled", *ray_args, **cache)["seconds"]
    for done, start in ((local, local_start), (on_ray, ray_start)):
        # the same command on one text: start-up (model, probe cache, Ray) and one row
        done["startup_seconds"] = start
        done["steady_tokens_per_s"] = done["tokens"] / max(done["seconds"] - start, 1e-9)
    server = Server("bundled", "fp32", work / "cache")
    try:
        texts = [row["text"] for row in load_corpus()]
        served = trio.run(drive, server.url, texts, 4, 32, args.seconds)
    finally:
        server.stop()
    model = m3_standin()
    sample = work / "sample.jsonl"
    sample.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[: args.standin_texts]))
    standin = embed(
        sample,
        work / "standin",
        str(model),
        "--outputs",
        "dense,sparse",
        BGE_TRIO_MAX_SEQ_LENGTH="512",
        **cache,
    )
    report = {
        "setup": {
            "cpus": cpu_count(),
            "machine": cpu_name(),
            "bf16_native": bf16_supported(),
            "repeat": args.repeat,
            "texts": local["rows"],
            "server_seconds": args.seconds,
        },
        "single_process": local,
        "ray_2x1": on_ray,
        "server": {
            "tokens_per_s": served["tokens_per_s"],
            "texts_per_s": served["texts_per_s"],
            "seconds": served["seconds"],
            "errors": served["errors"],
        },
        "standin_single_process": standin,
    }
    save_result("bulk", report)
    write_tables(report)
    print(table(report))


if __name__ == "__main__":
    main()
