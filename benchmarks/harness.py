"""The benchmarks' harness: the corpus, a server process, a load driver, the machine.

Every benchmark is a script on this and on :mod:`benchmarks.docs` (where results go);
servers start through the same launcher as the tests' (``bge_trio.testing.processes``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from bge_trio.testing.processes import bge_trio, start, stop

CORPUS = Path(__file__).with_name("corpus.jsonl")


def load_corpus() -> list[dict[str, str]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


class Server:
    """A real ``bge-trio serve`` process on a free loopback port (the tests' launcher)."""

    def __init__(self, model: str, dtype: str, cache_dir: Path, **settings: str) -> None:
        # the caller's BGE_TRIO_* variables apply (e.g. to compare settings), ours on top
        env = dict(os.environ)
        env.update(
            {
                "BGE_TRIO_CACHE_DIR": str(cache_dir),
                "BGE_TRIO_DTYPE": dtype,
                "BGE_TRIO_MAX_QUEUE_ITEMS": "100000",
                "BGE_TRIO_LOG_LEVEL": "WARNING",
                **{f"BGE_TRIO_{k.upper()}": v for k, v in settings.items()},
            }
        )
        command = [*bge_trio(), "serve", "--model", model, "--port", "0"]
        self.served = start(command, env, ready_s=600)  # a full-size probe takes minutes
        self.process, self.url = self.served.process, self.served.url

    def stop(self) -> None:
        stop(self.served, timeout=60)


async def drive(
    url: str, texts: list[str] | list[list[int]], concurrency: int, per_request: int, seconds: float
) -> dict[str, Any]:
    """Closed-loop load: each client sends its next request as soon as one returns."""
    latencies: list[float] = []
    counts = {"texts": 0, "tokens": 0, "shed": 0, "errors": 0}
    cursor = 0
    end = trio.current_time() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal cursor
        while trio.current_time() < end:
            batch = [texts[(cursor + i) % len(texts)] for i in range(per_request)]
            cursor += per_request
            started = time.perf_counter()
            r = await http.post(
                "/v1/embeddings", json={"input": batch, "encoding_format": "base64"}
            )
            if r.status_code == 429:  # shed: back off briefly, as a client should
                counts["shed"] += 1
                await trio.sleep(float(r.headers.get("retry-after", "1")) / 10)
                continue
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                counts["errors"] += 1
                continue
            counts["texts"] += per_request
            counts["tokens"] += r.json()["usage"]["prompt_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = trio.current_time()
    async with (
        httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(concurrency):
            nursery.start_soon(client, http)
    elapsed = trio.current_time() - started
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "texts_per_request": per_request,
        "seconds": elapsed,
        "requests": len(latencies),
        "shed_429": counts["shed"],
        "errors": counts["errors"],
        "texts_per_s": counts["texts"] / elapsed,
        "tokens_per_s": counts["tokens"] / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()
