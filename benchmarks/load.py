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
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import trio

from benchmarks.docs import load_result, result_path, save_result, write_block
from benchmarks.harness import Server, cpu_name, drive, load_corpus
from bge_trio.cgroups import cpu_count
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import bf16_supported, load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

CONCURRENCY = (1, 4, 16, 64)
SHAPES = (1, 32)


def averaged(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The mean of ideal runs taken before and after the server's scenarios.

    On a shared machine the CPU's speed drifts over minutes; measuring the ideal on
    both sides of the server's run, and showing both, keeps the ratio honest.
    """
    out: dict[str, Any] = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
    out["runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
    return out


async def http_floor(url: str, requests: int = 300) -> float:
    """p50 of GET /live through the same client: what any request costs the client and
    the HTTP stack before the server does any work for it."""
    samples = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for _ in range(requests):
            started = time.perf_counter()
            (await http.get("/live")).raise_for_status()
            samples.append(time.perf_counter() - started)
    return float(np.percentile(np.array(samples) * 1000, 50))


def ideal(
    encoder: Encoder, texts: list[str], max_tokens: int = 1024, workers: int = 1
) -> dict[str, float]:
    """The same texts in this process, length-sorted and cut into batches of at most
    ``max_tokens`` padded tokens (the server's default cap): no HTTP, no queue.

    With ``workers`` > 1 the batches are shared among that many threads running
    passes at once, as a server with BGE_TRIO_WORKERS does (load the encoder with
    cores / workers threads to match it).
    """
    ids = encoder.tokenize(texts)
    ids = [encoder.truncate(x, encoder.info.max_seq_length) for x in ids]
    batches: list[list[list[int]]] = [[]]
    for seq in sorted(ids, key=len):
        if batches[-1] and (len(batches[-1]) + 1) * len(seq) > max_tokens:
            batches.append([])
        batches[-1].append(seq)
    if workers == 1:  # on this thread: a second OpenMP team would slow both (see threads.py)
        encoder.forward(batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            encoder.forward(batch)
        elapsed = time.perf_counter() - started
        return {
            "texts_per_s": len(ids) / elapsed,
            "tokens_per_s": sum(len(x) for x in ids) / elapsed,
        }
    queue = list(reversed(batches))
    lock = threading.Lock()

    def work() -> None:
        encoder.forward(batches[0])  # warm-up of this thread
        barrier.wait()
        while True:
            with lock:
                if not queue:
                    return
                batch = queue.pop()
            encoder.forward(batch)

    barrier = threading.Barrier(workers + 1)
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "texts_per_s": len(ids) / elapsed,
        "tokens_per_s": sum(len(x) for x in ids) / elapsed,
    }


def raw_query_latency(encoder: Encoder, queries: list[str]) -> float:
    """p50 of tokenise + forward for one short query, in-process."""
    samples = []
    for text in queries:
        started = time.perf_counter()
        encoder.forward(encoder.tokenize([text]))
        samples.append(time.perf_counter() - started)
    return float(np.percentile(np.array(samples) * 1000, 50))


def quality(reference: Encoder, variant: Encoder, texts: list[str]) -> dict[str, float]:
    ids = [reference.truncate(x, reference.info.max_seq_length) for x in reference.tokenize(texts)]
    outputs = reference.info.outputs
    cosines, overlaps, colbert = [], [], []
    for i in range(0, len(ids), 16):
        chunk = ids[i : i + 16]
        for a, b in zip(
            reference.forward(chunk, outputs), variant.forward(chunk, outputs), strict=True
        ):
            assert a.dense is not None
            assert b.dense is not None
            cosines.append(float(a.dense @ b.dense))
            if a.sparse is not None and b.sparse is not None:
                sa, sb = set(a.sparse[0].tolist()), set(b.sparse[0].tolist())
                overlaps.append(len(sa & sb) / max(1, len(sa | sb)))
            if a.colbert is not None and b.colbert is not None:
                colbert.append(float(np.mean(np.sum(a.colbert * b.colbert, axis=1))))
    out = {"dense_cosine_min": min(cosines), "dense_cosine_mean": float(np.mean(cosines))}
    if overlaps:
        out["sparse_jaccard_mean"] = float(np.mean(overlaps))
    if colbert:
        out["colbert_cosine_mean"] = float(np.mean(colbert))
    return out


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
        "machine": {
            "cpu": cpu_name(),
            "cores": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "bf16_native": bf16_supported(),
        },
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
                    print(_row(result), flush=True)
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


def write_tables(report: dict[str, Any]) -> None:
    """The table, in docs/performance.md."""
    write_block("performance.md", "performance-table", table(report))


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


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['concurrency']} | {r['texts_per_request']} | {r['requests']} | "
        f"{r['shed_429']} | {r['texts_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.1f} | "
        f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['ratio_to_ideal']:.2f} |"
    )


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    native = {True: ", native bf16", False: ", no native bf16"}.get(m.get("bf16_native"), "")
    lines = [
        "<!-- generated by `python -m benchmarks.load` from performance.json; do not edit -->",
        f"Machine: {m['cpu']}, {m['cores']} cores{native}, torch {m['torch']}, "
        f"Python {m['python']}; "
        f"model {report['model']}; {report['seconds_per_scenario']:g} s per scenario.",
        "",
        "In-process ideal, fp32: "
        + " and ".join(f"{t:.0f}" for t in report["variants"]["fp32"]["ideal"]["runs_tokens_per_s"])
        + " tokens/s (before and after the server's scenarios; ratios use the mean).",
        "",
        "| concurrency | texts/request | requests | shed (429) | texts/s | tokens/s | p50 ms | "
        "p95 ms | p99 ms | server / ideal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_row(r) for r in report["scenarios"]),
        "",
    ]
    sq = report.get("short_query")
    if sq:
        lines += [
            f"Short query at concurrency 1: server p50 {sq['server_p50_ms']:.2f} ms, raw "
            f"forward p50 {sq['raw_forward_p50_ms']:.2f} ms, overhead "
            f"{sq['overhead_ms']:+.2f} ms; GET /live through the same client: p50 "
            f"{sq['http_floor_p50_ms']:.2f} ms.",
            "",
        ]
    lines += [
        "| dtype | served as | ideal tokens/s | server tokens/s (c16 x 32) | vs fp32 | "
        "dense cosine min / mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for dtype, v in report["variants"].items():
        q = v.get("quality_vs_fp32")
        quality_cell = (
            f"{q['dense_cosine_min']:.4f} / {q['dense_cosine_mean']:.4f}" if q else "reference"
        )
        lines.append(
            f"| {dtype} | {v['dtype_served']} | {v['ideal']['tokens_per_s']:.0f} | "
            f"{v['server_c16x32']['tokens_per_s']:.0f} | "
            f"{v['throughput_vs_fp32']:.2f}x | {quality_cell} |"
        )
    workers = report.get("workers") or []
    if workers:
        lines += [
            "",
            "Forward passes at once (BGE_TRIO_WORKERS) x torch threads each, fp32, 16 clients; "
            "each ideal runs the same arrangement in-process:",
            "",
            "| workers x threads | ideal tokens/s | 1 text/request: tokens/s | server / ideal | "
            "32 texts/request: tokens/s | server / ideal |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for w in workers:
            lines.append(
                f"| {w['workers']} x {w['threads']} | {w['ideal']['tokens_per_s']:.0f} | "
                f"{w['c16x1']['tokens_per_s']:.0f} | {w['c16x1']['ratio_to_ideal']:.2f} | "
                f"{w['c16x32']['tokens_per_s']:.0f} | {w['c16x32']['ratio_to_ideal']:.2f} |"
            )
    heads = report.get("m3_heads_quality") or {}
    if heads:
        lines += [
            "",
            "Sparse and ColBERT agreement with fp32 (tiny BGE-M3-layout model):",
            "",
            "| dtype | sparse Jaccard mean | ColBERT cosine mean |",
            "| --- | --- | --- |",
        ]
        for dtype, q in heads.items():
            lines.append(
                f"| {dtype} | {q.get('sparse_jaccard_mean', float('nan')):.4f} | "
                f"{q.get('colbert_cosine_mean', float('nan')):.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for shape in SHAPES:
        rows = [r for r in report["scenarios"] if r["texts_per_request"] == shape]
        x = [r["concurrency"] for r in rows]
        left.plot(
            x,
            [r["tokens_per_s"] for r in rows],
            marker="o",
            label=f"server, {shape} text(s)/request",
        )
        right.plot(x, [r["p50_ms"] for r in rows], marker="o", label=f"p50, {shape}/request")
        right.plot(
            x,
            [r["p99_ms"] for r in rows],
            marker="x",
            linestyle="--",
            label=f"p99, {shape}/request",
        )
    ideal_tokens = report["variants"]["fp32"]["ideal"]["tokens_per_s"]
    left.axhline(ideal_tokens, color="k", linestyle=":", label="ideal (in-process)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    left.set_ylabel("tokens / s")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    fig.suptitle(f"{report['model']} on {report['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(result_path("performance", ".png"), dpi=110)


if __name__ == "__main__":
    main()
