"""torch against OpenVINO, through the server: short queries, throughput, a long text,
quality and cold start.

    python -m benchmarks.backends [--models standin,minilm] [--seconds 20] [--tables-only]

For each model (the full-size BGE-M3 stand-in and the bundled MiniLM) and each
configuration (torch fp32, torch bf16, OpenVINO bf16 where the CPU computes bf16
natively, else OpenVINO fp32), one real ``bge-trio serve`` with default settings
otherwise:

- **cold start**: process start to ``/health`` ready, the first time (OpenVINO converts,
  every configuration probes) and again with everything cached;
- **short query**: p50 of a 12-token query sent one at a time, beside the floor a query
  cannot beat: the transformer's non-embedding weights in the served precision (each is
  read once) divided by the memory bandwidth, measured in the same run (the best of five
  sums over a 1 GiB tensor with the server's threads);
- **c16 x 256**: tokens per second with 16 clients, one 256-token text per request;
- **one 2048-token text** (MiniLM: its longest, 256): tokens per second of one text alone;
- **quality**: dense cosine to the torch fp32 server's vectors over 64 corpus texts;
- **where a short query's time goes** (OpenVINO): the compiled model alone, in this
  process, on passes of 1, 14 (the 12-token query with its two special tokens) and 64
  tokens. One token reads every weight and does little else: its time against the floor
  says how close the kernels come to the memory bandwidth. 64 tokens are bound by
  arithmetic: their rate (2 x non-embedding parameters x tokens per second) gives the
  14-token pass's compute floor, and a pass costs at least the larger of the two floors.

Writes ``docs/results/backends.json``, its plot, and its table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import trio
from safetensors import safe_open

from benchmarks.docs import load_result, save_result
from benchmarks.harness import Server, cpu_name, drive, load_corpus, m3_standin
from benchmarks.reports.backends import publish
from bge_trio.cgroups import cpu_count
from bge_trio.model.loading import bf16_supported
from bge_trio.model.source import resolve_model

QUERY_TOKENS = 12
# passes the compiled model alone is timed on: one token, the query with its two special
# tokens, and enough tokens to be bound by arithmetic rather than by reading the weights
# (the report's profile table names them: keep the two in step)
PROFILE_TOKENS = (1, QUERY_TOKENS + 2, 64)


def configurations(native_bf16: bool) -> list[tuple[str, str]]:
    ov_dtype = "bf16" if native_bf16 else "fp32"
    return [("torch", "fp32"), ("torch", "bf16"), ("openvino", ov_dtype)]


def bandwidth_bytes_per_s(threads: int) -> float:
    torch.set_num_threads(threads)
    block = torch.ones(1 << 29, dtype=torch.bfloat16)  # 1 GiB
    best = min(_timed(lambda: block.sum()) for _ in range(5))
    return block.numel() * block.element_size() / best


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def floor_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the transformer's weights a one-token pass reads (not the embeddings,
    of which it reads a row per token)."""
    count = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open has no __iter__
            if "embeddings" not in name:
                count += int(np.prod(weights.get_slice(name).get_shape()))
    return count * (2 if dtype == "bf16" else 4)


def ids_of(tokens: int, seed: int = 0) -> list[int]:
    """A text as token ids (sent as they are), valid in both models' vocabularies: the
    stand-in's tokenizer is synthetic, so words would not give the lengths asked."""
    return np.random.default_rng(seed).integers(1000, 5000, size=tokens).tolist()  # type: ignore[no-any-return]


async def measure(url: str, seconds: float, corpus: list[str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        latencies = []
        for _ in range(25):
            started = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"input": [ids_of(QUERY_TOKENS)]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
        long_s, long_tokens = [], 0
        for _ in range(2):  # 2048 tokens, or the model's longest input
            started = time.perf_counter()
            r = await http.post("/v1/embeddings", json={"input": [ids_of(2048)]})
            r.raise_for_status()
            long_s.append(time.perf_counter() - started)
            long_tokens = r.json()["usage"]["prompt_tokens"]
        r = await http.post("/v1/embeddings", json={"input": corpus})
        vectors = np.array([d["embedding"] for d in r.json()["data"]])
    load = await drive(url, [ids_of(256)], concurrency=16, per_request=1, seconds=seconds)
    return {
        "short_p50_ms": statistics.median(latencies[5:]) * 1000,
        "c16x256_tokens_per_s": load["tokens_per_s"],
        "one_long_tokens": long_tokens,
        "one_2048_tokens_per_s": long_tokens / min(long_s),
        "vectors": vectors,
    }


def compiled_profile(model: str, dtype: str, cache: Path, threads: int) -> dict[str, Any]:
    """The server's converted model, compiled in this process as the server compiles it:
    the p50 of a pass of each of :data:`PROFILE_TOKENS` tokens (one text), in ms, and the
    arithmetic rate the longest reaches."""
    from bge_trio.config import Settings
    from bge_trio.engine.backend import openvino_directory
    from bge_trio.model.openvino import OpenVinoTransformer

    settings = Settings.from_env(
        {"BGE_TRIO_DTYPE": dtype, "BGE_TRIO_BACKEND": "openvino", "BGE_TRIO_CACHE_DIR": str(cache)}
    )
    source = resolve_model(model)
    compiled = OpenVinoTransformer(
        openvino_directory(settings, source), threads=threads, express_threads=0, dtype=dtype
    )
    params = floor_bytes(Path(source.path), "fp32") // 4
    pass_ms = {}
    for tokens in PROFILE_TOKENS:
        ids = torch.tensor([ids_of(tokens)])
        inputs = [ids, torch.ones_like(ids)]
        times = []
        for _ in range(12):
            started = time.perf_counter()
            compiled.run(inputs, None, express=False)
            times.append(time.perf_counter() - started)
        pass_ms[str(tokens)] = statistics.median(times[2:]) * 1000
    longest = PROFILE_TOKENS[-1]
    rate = 2 * params * longest / (pass_ms[str(longest)] / 1000)
    return {
        "pass_ms": pass_ms,
        "gflop_per_s": rate / 1e9,
        "query_compute_floor_ms": 2 * params * (QUERY_TOKENS + 2) / rate * 1000,
    }


def run_model(name: str, model: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    rows = []
    corpus = [r["text"] for r in load_corpus()[:64]]
    reference = None
    for backend, dtype in configurations(bf16_supported()):
        cold = []
        for _ in range(2):
            started = time.perf_counter()
            server = Server(model, dtype, cache, backend=backend, request_timeout_s="600")
            cold.append(time.perf_counter() - started)
            if len(cold) == 1:
                server.stop()
        try:
            got = trio.run(measure, server.url, args.seconds, corpus)
        finally:
            server.stop()
        vectors = got.pop("vectors")
        if reference is None:  # torch fp32 comes first
            reference = vectors
        cosines = (vectors * reference).sum(1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
        )
        row = {"backend": backend, "dtype": dtype, "cold_start_s": cold[0], "restart_s": cold[1]}
        row |= got | {"cosine_min": float(cosines.min())}
        if backend == "openvino":  # with the server stopped: the cores are this process's
            row["compiled"] = compiled_profile(model, dtype, cache, cpu_count())
        rows.append(row)
        print(name, row, flush=True)
    return {"model": name, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="standin,minilm")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the table and plot from backends.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        publish(load_result("backends"))
        return
    threads = cpu_count()
    paths = {"standin": m3_standin(), "minilm": resolve_model("bundled").path}
    report: dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": threads,
        "native_bf16": bf16_supported(),
        "date": time.strftime("%Y-%m-%d"),
        "bandwidth_gb_s": bandwidth_bytes_per_s(threads) / 1e9,
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bge-trio-backends-") as cache:
        for name in args.models.split(","):
            result = run_model(name, str(paths[name]), args, Path(cache))
            result["floor_ms"] = {
                dtype: floor_bytes(paths[name], dtype) / (report["bandwidth_gb_s"] * 1e9) * 1000
                for dtype in ("fp32", "bf16")
            }
            report["models"].append(result)
    save_result("backends", report)
    publish(report)


if __name__ == "__main__":
    main()
