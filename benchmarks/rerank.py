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

from benchmarks.docs import result_path, write_block
from benchmarks.fairness import QUERY, queries, standin
from benchmarks.harness import Server, cpu_name
from benchmarks.m3 import MODELS
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported
from bge_trio.testing import build_full_reranker

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


def reranker_standin(layers: int) -> Path:
    name = "bge-reranker-standin" if layers == 24 else f"bge-reranker-standin-{layers}"
    directory = MODELS / name
    if not (directory / "model.safetensors").is_file():
        build_full_reranker(directory, layers=layers)
    return directory


def _document(tokens: int, seed: int, model: Path) -> str:
    """Words drawn at random up to ``tokens`` tokens of the stand-ins' tokenizer."""
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) < tokens:
        words.extend(rng.choice(WORDS, size=8))
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:tokens]
    return str(tokenizer.decode(ids))


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    """VmHWM back to the resident size (the kernel's clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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
        resident_kib = _rss_kib(pid)
        _reset_peak(pid)
        alone_s, body = await _rerank(http, docs)
        peak_kib = _hwm_kib(pid)
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
            nursery.start_soon(queries, http, args.deadline_s, 2.0, beside, t0)
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
    models = f"m3={standin(args.layers)},reranker={reranker}"
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


def write_table(result: dict[str, Any]) -> None:
    text = table(result)
    write_block("performance.md", "rerank-table", text)


def table(result: dict[str, Any]) -> str:
    setup = result["setup"]
    dtypes = ", ".join(f"{m['model_id']} {m['dtype']}" for m in result["models"])
    idle, beside = result["queries_idle"], result["queries_beside_rerank"]
    alone = result["rerank_alone_s"]
    lines = [
        "<!-- generated by `python -m benchmarks.rerank` from rerank.json; do not edit -->",
        f"{setup['models']}; {setup['cpu']}, {setup['cpu_threads']} cores, native bf16: "
        f"{setup['native_bf16']}; {dtypes}; {setup['date']}.",
        "",
        "| | seconds | |",
        "| --- | --- | --- |",
        f"| rerank {setup['docs']} documents of ~{setup['doc_tokens']} tokens, alone | "
        f"{alone:.1f} | {result['rerank_tokens']} tokens, "
        f"{result['rerank_tokens_per_s']:.0f} tokens/s; peak "
        f"{result['rerank_peak_above_resident_mib']:.0f} MiB above the "
        f"{result['resident_mib']:.0f} MiB resident |",
        f"| the same, beside short queries at 2/s | {result['rerank_beside_queries_s']:.1f} | "
        f"{result['rerank_beside_queries_s'] / alone:.2f}x alone |",
        f"| the same, beside {setup['long_tokens']}-token documents back to back | "
        f"{result['rerank_beside_long_documents_s']:.1f} | "
        f"{result['rerank_beside_long_documents_s'] / alone:.2f}x alone; "
        f"{result['long_documents_done_meanwhile']} documents embedded meanwhile |",
        "",
        "| short embedding queries | sent | answered 200 | p50 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in (("alone, one at a time", idle), ("at 2/s beside the rerank", beside)):
        lines.append(
            f"| {name} | {row['sent']} | {row['ok']} | {row['p50_ms']:.0f} | {row['max_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
