"""The benchmarks' harness: the corpus, the models, a server process, a load driver,
the serving process's memory, the machine.

Every benchmark is a script on this, on :mod:`benchmarks.inprocess` (the same model in
the benchmark's own process) and on :mod:`benchmarks.docs` (where results go); its tables
and plots are generated from its JSON by its module in :mod:`benchmarks.reports`.
Servers start through the same launcher as the tests' (``bge_trio.testing.processes``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import trio

from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported
from bge_trio.testing import build_full_m3, build_full_reranker
from bge_trio.testing.processes import bge_trio, start, stop

CORPUS = Path(__file__).with_name("corpus.jsonl")
# full-size stand-ins are built once (minutes, a few GB) and kept here between runs
MODELS = Path.home() / ".cache" / "bge-trio" / "bench"


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


def m3_standin(layers: int = 24) -> Path:
    """The full-size BGE-M3 stand-in (BAAI/bge-m3's config, random weights), built once."""
    directory = MODELS / ("bge-m3-standin" if layers == 24 else f"bge-m3-standin-{layers}")
    if not (directory / "model.safetensors").is_file():
        print(f"building the full-size stand-in in {directory} ...", flush=True)
        build_full_m3(directory, layers=layers)
    return directory


def reranker_standin(layers: int = 24) -> Path:
    """The full-size bge-reranker-v2-m3 stand-in (random weights), built once."""
    name = "bge-reranker-standin" if layers == 24 else f"bge-reranker-standin-{layers}"
    directory = MODELS / name
    if not (directory / "model.safetensors").is_file():
        build_full_reranker(directory, layers=layers)
    return directory


def status_bytes(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """The process's VmHWM back to its resident size (the kernel's ``clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def machine() -> dict[str, Any]:
    """What every benchmark records about where it ran: the CPU model, the threads the
    server would use, whether bf16 is native (it decides what ``auto`` serves), the
    versions and the date."""
    return {
        "cpu": cpu_name(),
        "cores": cpu_count(),
        "bf16_native": bf16_supported(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date.today().isoformat(),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


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


# a short query (about ten tokens), as retrieval clients send them
QUERY = "what is the capital of france and why"


async def paced_queries(
    http: httpx.AsyncClient, seconds: float, rate: float, out: list[dict[str, Any]], t0: float
) -> None:
    """Open loop: one query every 1/rate seconds, whatever the previous ones do."""

    async def one(sent: float) -> None:
        r = await http.post("/v1/embeddings", json={"input": QUERY})
        out.append(
            {"sent_s": sent - t0, "latency_s": time.perf_counter() - sent, "status": r.status_code}
        )

    async with trio.open_nursery() as nursery:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            nursery.start_soon(one, time.perf_counter())
            await trio.sleep(1 / rate)
