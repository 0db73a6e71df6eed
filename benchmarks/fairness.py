"""Short queries while long documents run: latency, and what it costs the documents.

    python -m benchmarks.fairness [--layers 24] [--mixed-s 300] [--doc-tokens 8000]

On the full-size BGE-M3 stand-in (see ``bge_trio.testing.build_full_m3``) served by a
real ``bge-trio serve`` with default settings (the request deadline raised so that an
8,000-token document can finish on a slow machine; it is reported), in three phases:

1. idle: short queries (~10 tokens) one at a time (the idle latency the target is
   judged against), then at 2 per second with nothing else running;
2. one document alone: its time with the whole machine;
3. mixed: documents of ``--doc-tokens`` token ids sent back to back by one client,
   and short queries at 2 per second from another, for ``--mixed-s`` seconds.

Writes ``docs/results/fairness.json`` and ``docs/results/fairness.png`` (query latency
over time, with the documents' passes shaded), and generates its table into
``docs/performance.md``; ``--from-json`` rewrites the table and plot from an earlier
run's JSON.
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

from benchmarks.docs import result_path
from benchmarks.harness import QUERY, Server, cpu_name, m3_standin, paced_queries
from benchmarks.reports.fairness import plot, write_table
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported


def _doc(tokens: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [0, *rng.integers(5, 250_000, size=tokens - 2).tolist(), 2]


async def documents(
    http: httpx.AsyncClient, seconds: float, tokens: int, out: list[dict[str, Any]], t0: float
) -> None:
    """Closed loop: the next document as soon as the previous one is answered."""
    end = time.perf_counter() + seconds
    seed = 100
    while time.perf_counter() < end:
        sent = time.perf_counter()
        r = await http.post("/v1/embeddings", json={"input": [_doc(tokens, seed)]})
        seed += 1
        body = r.json()
        out.append(
            {
                "sent_s": sent - t0,
                "done_s": time.perf_counter() - t0,
                "status": r.status_code,
                "error": body.get("error", {}).get("code") if r.status_code != 200 else None,
            }
        )
        if r.status_code != 200:
            await trio.sleep(1)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r["latency_s"] for r in rows if r["status"] == 200]
    return {
        "sent": len(rows),
        "ok": len(ok),
        "statuses": sorted({r["status"] for r in rows}),
        "p50_ms": 1000 * statistics.median(ok) if ok else None,
        "p99_ms": 1000 * float(np.percentile(ok, 99)) if ok else None,
        "max_ms": 1000 * max(ok) if ok else None,
    }


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    limits = httpx.Timeout(args.deadline_s + 60)
    async with httpx.AsyncClient(base_url=url, timeout=limits) as http:
        for _ in range(3):  # warm-up
            await http.post("/v1/embeddings", json={"input": QUERY})
        t0 = time.perf_counter()
        alone: list[dict[str, Any]] = []
        for _ in range(args.idle_queries):
            sent = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"input": QUERY})
            alone.append(
                {
                    "sent_s": sent - t0,
                    "latency_s": time.perf_counter() - sent,
                    "status": r.status_code,
                }
            )
        idle: list[dict[str, Any]] = []
        await paced_queries(http, args.idle_s, args.rate, idle, t0)
        sent = time.perf_counter()
        r = await http.post("/v1/embeddings", json={"input": [_doc(args.doc_tokens, 1)]})
        alone_s = time.perf_counter() - sent
        assert r.status_code == 200, r.text
        t1 = time.perf_counter()
        mixed: list[dict[str, Any]] = []
        docs: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(documents, http, args.mixed_s, args.doc_tokens, docs, t1)
            await trio.sleep(1)
            nursery.start_soon(paced_queries, http, args.mixed_s - 1, args.rate, mixed, t1)
        info = (await http.get("/info")).json()
    done = [d for d in docs if d["status"] == 200]
    idle_summary = _summary(alone)
    mixed_summary = _summary(mixed)
    return {
        "idle": idle_summary,
        "idle_at_rate": _summary(idle),
        "mixed": mixed_summary,
        "p99_over_idle_p50": (
            mixed_summary["p99_ms"] / idle_summary["p50_ms"]
            if mixed_summary["p99_ms"] and idle_summary["p50_ms"]
            else None
        ),
        "document_alone_s": alone_s,
        "documents": docs,
        "documents_done": len(done),
        "document_mixed_s": [d["done_s"] - d["sent_s"] for d in done],
        "queries": mixed,
        "speed": info.get("speed"),
        "lanes": {k: info.get(k) for k in ("workers", "threads_per_pass", "express_lane")},
        "dtype": info.get("dtype"),
        "dtype_reason": info.get("dtype_reason"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--doc-tokens", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=2.0, help="short queries per second")
    parser.add_argument("--idle-queries", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--mixed-s", type=float, default=300.0)
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--out", default=str(result_path("fairness")))
    parser.add_argument("--from-json", action="store_true", help="only redraw from --out")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(Path(args.out).read_text())
        write_table(result)
        plot(result, Path(args.out).with_suffix(".png"))
        return
    model = m3_standin(args.layers)
    cache = Path(tempfile.mkdtemp(prefix="bge-trio-fairness-"))
    server = Server(
        str(model),
        os.environ.get("BGE_TRIO_DTYPE", "auto"),
        cache,
        request_timeout_s=str(args.deadline_s),
    )
    try:
        result = trio.run(run, args, server.url)
    finally:
        server.stop()
    result["setup"] = {
        "model": f"BGE-M3 stand-in, {args.layers} layers",
        "cpu": cpu_name(),
        "cpu_threads": cpu_count(),
        "native_bf16": bf16_supported(),
        "doc_tokens": args.doc_tokens,
        "query_rate_per_s": args.rate,
        "mixed_s": args.mixed_s,
        "request_timeout_s": args.deadline_s,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    write_table(result)
    plot(result, Path(args.out).with_suffix(".png"))
    m, i = result["mixed"], result["idle"]
    print(
        f"idle p50 {i['p50_ms']:.0f} ms; mixed p50 {m['p50_ms']:.0f} p99 {m['p99_ms']:.0f} ms "
        f"({result['p99_over_idle_p50']:.2f}x idle p50), {m['ok']}/{m['sent']} ok; "
        f"document alone {result['document_alone_s']:.1f} s, under queries "
        f"{result['document_mixed_s']}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
