"""A cross-encoder beside BGE-M3 in one process: a rerank's time and peak, and how the
two models share the cores.

    python -m benchmarks.rerank [--layers 24] [--docs 100] [--doc-tokens 256]

On the full-size stand-ins (``bge_trio.testing.build_full_m3`` and
``build_full_reranker``: bge-reranker-v2-m3's config, random weights), served together
by one real ``bge-trio serve`` with default settings (the request deadline raised so a
slow machine finishes; it is reported):

1. a rerank of ``--docs`` documents of ``--doc-tokens`` tokens alone: its time, and the
   process's peak resident memory (VmHWM) above its resident size before it;
2. short embedding queries one at a time alone, then at 2 per second while that rerank
   runs: do they starve behind it?
3. the rerank again while a client embeds ``--long-tokens``-token documents back to
   back: does the rerank starve behind them?

Writes ``docs/results/rerank.json`` and its table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio
from tokenizers import Tokenizer

from benchmarks.docs import result_path
from benchmarks.harness import (
    QUERY,
    Server,
    cpu_name,
    m3_standin,
    paced_queries,
    reranker_standin,
    reset_peak,
    status_bytes,
)
from benchmarks.reports.rerank import table, write_table
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "markets",
    "fell",
    "sharply",
]


def _document(tokens: int, seed: int, model: Path) -> str:
    """Words drawn at random up to ``tokens`` tokens of the stand-ins' tokenizer."""
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) < tokens:
        words.extend(rng.choice(WORDS, size=8))
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:tokens]
    return str(tokenizer.decode(ids))


async def _rerank(http: httpx.AsyncClient, docs: list[str]) -> tuple[float, dict[str, Any]]:
    sent = time.perf_counter()
    r = await http.post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": docs})
    assert r.status_code == 200, r.text
    return time.perf_counter() - sent, r.json()


async def _long_documents(
    http: httpx.AsyncClient, tokens: int, stop: trio.Event, model: Path
) -> int:
    done = 0
    seed = 1000
    while not stop.is_set():
        body = {"model": "m3", "input": [_document(tokens, seed, model)]}
        r = await http.post("/v1/embeddings", json=body)
        seed += 1
        done += r.status_code == 200
    return done


def _latencies(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [row["latency_s"] for row in rows if row["status"] == 200]
    return {
        "sent": len(rows),
        "ok": len(ok),
        "p50_ms": 1000 * statistics.median(ok) if ok else None,
        "max_ms": 1000 * max(ok) if ok else None,
    }


async def run(args: argparse.Namespace, server: Server, model: Path) -> dict[str, Any]:
    docs = [_document(args.doc_tokens, seed, model) for seed in range(args.docs)]
    pid = server.process.pid
    async with httpx.AsyncClient(base_url=server.url, timeout=args.deadline_s + 60) as http:
        for _ in range(3):  # warm-up of both models
            await http.post("/v1/embeddings", json={"model": "m3", "input": QUERY})
            await _rerank(http, docs[:2])
        resident_kib = status_bytes(pid, "VmRSS") // 1024
        reset_peak(pid)
        alone_s, body = await _rerank(http, docs)
        peak_kib = status_bytes(pid, "VmHWM") // 1024
        tokens = body["usage"]["prompt_tokens"]

        t0 = time.perf_counter()
        idle: list[dict[str, Any]] = []
        for _ in range(args.idle_queries):
            sent = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"model": "m3", "input": QUERY})
            idle.append({"latency_s": time.perf_counter() - sent, "status": r.status_code})

        beside: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            span: list[float] = []

            async def rerank_then_stop() -> None:
                seconds, _ = await _rerank(http, docs)
                span.append(seconds)
                nursery.cancel_scope.cancel()

            nursery.start_soon(rerank_then_stop)
            nursery.start_soon(paced_queries, http, args.deadline_s, 2.0, beside, t0)
        rerank_beside_queries_s = span[0]

        stop = trio.Event()
        finished: list[int] = []
        async with trio.open_nursery() as nursery:

            async def embed_long() -> None:
                finished.append(await _long_documents(http, args.long_tokens, stop, model))

            nursery.start_soon(embed_long)
            await trio.sleep(1)
            rerank_beside_documents_s, _ = await _rerank(http, docs)
            stop.set()
        info = (await http.get("/info")).json()
    return {
        "rerank_alone_s": alone_s,
        "rerank_tokens": tokens,
        "rerank_tokens_per_s": tokens / alone_s,
        "resident_mib": resident_kib / 1024,
        "rerank_peak_above_resident_mib": (peak_kib - resident_kib) / 1024,
        "queries_idle": _latencies(idle),
        "queries_beside_rerank": _latencies(beside),
        "rerank_beside_queries_s": rerank_beside_queries_s,
        "rerank_beside_long_documents_s": rerank_beside_documents_s,
        "long_documents_done_meanwhile": finished[0] if finished else 0,
        "models": [
            {k: m.get(k) for k in ("model_id", "kind", "dtype", "dtype_reason", "max_seq_length")}
            for m in info.get("models", [info])
        ],
        "memory": {m["model_id"]: m.get("memory", {}) for m in info.get("models", [info])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--long-tokens", type=int, default=2048)
    parser.add_argument("--idle-queries", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=900.0)
    parser.add_argument("--out", default=str(result_path("rerank")))
    parser.add_argument("--from-json", action="store_true", help="only rewrite the table")
    args = parser.parse_args()
    if args.from_json:
        write_table(json.loads(Path(args.out).read_text()))
        return
    reranker = reranker_standin(args.layers)
    models = f"m3={m3_standin(args.layers)},reranker={reranker}"
    cache = Path(tempfile.mkdtemp(prefix="bge-trio-rerank-"))
    server = Server(
        models,
        os.environ.get("BGE_TRIO_DTYPE", "auto"),
        cache,
        request_timeout_s=str(args.deadline_s),
    )
    try:
        result = trio.run(run, args, server, reranker)
    finally:
        server.stop()
    result["setup"] = {
        "models": f"BGE-M3 and bge-reranker-v2-m3 stand-ins, {args.layers} layers, one process",
        "cpu": cpu_name(),
        "cpu_threads": cpu_count(),
        "native_bf16": bf16_supported(),
        "docs": args.docs,
        "doc_tokens": args.doc_tokens,
        "long_tokens": args.long_tokens,
        "request_timeout_s": args.deadline_s,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    write_table(result)
    print(table(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
