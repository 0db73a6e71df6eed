"""Load benchmark: the server against the same model run in-process with no HTTP.

    python -m benchmarks.load [--model bundled] [--seconds 8] [--dtypes fp32,bf16,int8]

For each scenario (concurrency 1, 4, 16, 64; requests of 1 or 32 texts) a trio + httpx
load generator drives a live ``bge-trio serve`` on 127.0.0.1 for a fixed time and
records throughput and latency. The ideal is the same corpus through the same
model in this process: length-sorted, in batches of at most 1024 padded tokens,
with the same threads, measured before and after the server's run. Then the dtype
variants (throughput and quality against fp32) and the thread arrangements (one
pass on all cores against one pass per core). Writes docs/results/performance.json and
docs/results/performance.png, and its table into docs/performance.md; ``--tables-only``
rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
import trio

from benchmarks.docs import load_result, save_result
from benchmarks.harness import Server, drive, http_floor, load_corpus, machine
from benchmarks.inprocess import averaged, ideal, quality, raw_query_latency
from benchmarks.reports.load import plot, row, table, write_tables
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

CONCURRENCY = (1, 4, 16, 64)
SHAPES = (1, 32)  # texts per request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--dtypes", default="fp32,bf16,int8")
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the tables from performance.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("performance"))
        return
    dtypes = args.dtypes.split(",")

    corpus = load_corpus()
    texts = [row["text"] for row in corpus]
    queries = [row["text"] for row in corpus if row["kind"] == "query"]
    prepare_process("predictable")  # as the server does
    source = resolve_model(args.model)
    threads = cpu_count()
    encoders = {d: load_encoder(source, dtype=d, threads=threads) for d in dtypes}
    report: dict[str, Any] = {
        "machine": machine(),
        "model": encoders["fp32"].info.name,
        "seconds_per_scenario": args.seconds,
        "scenarios": [],
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as cache:
        for dtype in dtypes:
            encoder = encoders[dtype]
            before = ideal(encoder, texts)
            server = Server(args.model, dtype, Path(cache))
            try:
                if dtype == "fp32":
                    for concurrency in CONCURRENCY:
                        for shape in SHAPES:
                            result = trio.run(
                                drive, server.url, texts, concurrency, shape, args.seconds
                            )
                            report["scenarios"].append(result)
                    short = trio.run(drive, server.url, queries, 1, 1, args.seconds)
                    raw = raw_query_latency(encoder, queries[:100])
                    report["short_query"] = {
                        "server_p50_ms": short["p50_ms"],
                        "raw_forward_p50_ms": raw,
                        "overhead_ms": short["p50_ms"] - raw,
                        "http_floor_p50_ms": trio.run(http_floor, server.url),
                    }
                loaded = trio.run(drive, server.url, texts, 16, 32, args.seconds)
            finally:
                server.stop()
            best = averaged([before, ideal(encoder, texts)])
            if dtype == "fp32":
                for result in report["scenarios"]:
                    result["ratio_to_ideal"] = result["tokens_per_s"] / best["tokens_per_s"]
                    print(row(result), flush=True)
            variant: dict[str, Any] = {
                "ideal": best,
                "server_c16x32": loaded,
                "dtype_served": encoder.info.dtype,
            }
            if dtype != "fp32":
                variant["quality_vs_fp32"] = quality(encoders["fp32"], encoder, texts)
            report["variants"][dtype] = variant
            print(
                f"{dtype}: ideal {best['tokens_per_s']:.0f} tok/s, server "
                f"{loaded['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
    base = report["variants"]["fp32"]
    for variant in report["variants"].values():
        variant["throughput_vs_fp32"] = (
            variant["server_c16x32"]["tokens_per_s"] / base["server_c16x32"]["tokens_per_s"]
        )
    report["m3_heads_quality"] = m3_heads_quality(dtypes)
    report["workers"] = compare_workers(args.model, texts, args.seconds)
    save_result("performance", report)
    write_tables(report)
    plot(report)
    print(table(report))


def compare_workers(model: str, texts: list[str], seconds: float) -> list[dict[str, Any]]:
    """fp32 with one forward pass on all cores against one pass per core, single-threaded."""
    rows = []
    cores = cpu_count()
    for workers in sorted({1, cores}):
        threads = max(1, cores // workers)
        encoder = load_encoder(resolve_model(model), dtype="fp32", threads=threads)
        before = ideal(encoder, texts, workers=workers)
        row: dict[str, Any] = {"workers": workers, "threads": threads}
        with tempfile.TemporaryDirectory() as cache:
            server = Server(model, "fp32", Path(cache), workers=str(workers))
            try:
                for shape in SHAPES:
                    row[f"c16x{shape}"] = trio.run(drive, server.url, texts, 16, shape, seconds)
            finally:
                server.stop()
        best = row["ideal"] = averaged([before, ideal(encoder, texts, workers=workers)])
        for shape in SHAPES:
            result = row[f"c16x{shape}"]
            result["ratio_to_ideal"] = result["tokens_per_s"] / best["tokens_per_s"]
        print(
            f"workers {workers} x {threads} threads: ideal {best['tokens_per_s']:.0f}, "
            f"c16x1 {row['c16x1']['tokens_per_s']:.0f}, c16x32 {row['c16x32']['tokens_per_s']:.0f}",
            flush=True,
        )
        rows.append(row)
    torch.set_num_threads(cores)
    return rows


def m3_heads_quality(dtypes: list[str]) -> dict[str, Any]:
    """Sparse and ColBERT agreement of each variant, on the tiny BGE-M3-layout model."""
    from bge_trio.testing import build_tiny_m3

    texts = [row["text"] for row in load_corpus()][:64]
    with tempfile.TemporaryDirectory() as directory:
        source = resolve_model(str(build_tiny_m3(Path(directory))))
        reference = load_encoder(source, dtype="fp32", threads=cpu_count())
        return {
            d: quality(reference, load_encoder(source, dtype=d, threads=cpu_count()), texts)
            for d in dtypes
            if d != "fp32"
        }


if __name__ == "__main__":
    main()
