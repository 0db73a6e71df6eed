"""BGE-M3 at full size: probe time, probe fidelity, held-out accuracy, resident accounting.

    python -m benchmarks.m3 [--dtypes fp32,bf16] [--limit-gib N] [--skip-minilm] [--update]

Builds the full-size stand-in (BAAI/bge-m3's architecture and vocabulary, random
weights; see ``bge_trio.testing.build_full_m3``) once into ``~/.cache/bge-trio/bench``
and measures, per dtype:

- one 4 x 256 forward pass in-process at full depth (the unit the probe time is judged in);
- the two-layer probe against full depth: the same shapes' peaks measured both ways;
- cold start to ready of a real server (``bge-trio serve``, empty probe cache) and the
  probe's own seconds;
- held-out shapes measured black-box on that serving process: reset its VmHWM through
  ``/proc/PID/clear_refs``, send one request of B texts of exactly S token ids (one
  pass), read its VmHWM; the rise above the RSS just before the request compared with
  the server's cost model (the peak above the resident size the server budgets is kept
  too: it adds what the process has grown since startup);
- the resident size the budget counts (weights, runtime) against the process's RSS
  after passes whose ids span the whole vocabulary;
- the cost of measuring every served pass (the high-water-mark reset and read).

The same held-out measurement runs on the bundled all-MiniLM-L6-v2. Writes
``docs/results/memory-m3.json`` and ``docs/results/memory-m3.png``, and its tables into
``docs/memory-model.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.docs import load_result, result_path, save_result
from benchmarks.harness import Server, m3_standin, machine, reset_peak, status_bytes
from benchmarks.reports.m3 import plot, write_tables
from bge_trio.cgroups import cpu_count
from bge_trio.memory.plan import PROBE_LAYERS, synthetic_forward
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

MIB = 1 << 20
GIB = 1 << 30
LIMIT_GIB = {"fp32": 6.0, "bf16": 3.0}

# Shapes the probe never measures (it measures (1, 8192), (4, 2048), (16, 512), (8, 512)).
M3_HELD_OUT = [
    (24, 128),
    (12, 333),
    (3, 1000),
    (5, 700),
    (2, 3000),
    (1, 6000),
    (1, 7000),
    (3, 2500),
]
MINILM_HELD_OUT = [
    (3, 512),
    (2, 384),
    (24, 102),
    (48, 170),
    (12, 192),
    (96, 42),
    (6, 448),
    (160, 32),
    (10, 448),
    (20, 400),
    (30, 512),
    (48, 96),
]
# Shapes for the two-layer-vs-full-depth comparison (full depth is slow: keep them small).
DEPTH_SHAPES = [(16, 128), (4, 1024), (1, 2048)]


def in_process(model: Path, dtype: str) -> dict[str, Any]:
    """One 4 x 256 pass at full depth, and full depth against the probe's two layers."""
    prepare_process("predictable")
    encoder = load_encoder(resolve_model(str(model)), dtype=dtype, threads=cpu_count())
    started = time.perf_counter()
    weights = encoder.make_weights_resident()
    touch_s = time.perf_counter() - started
    forward = synthetic_forward(encoder)
    forward(4, 256)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        forward(4, 256)
        times.append(time.perf_counter() - started)
    meter = PeakMeter()
    depth = []
    for batch, seq in DEPTH_SHAPES:
        forward(batch, seq)
        full = meter.measure(partial(forward, batch, seq))
        with encoder.shallow(PROBE_LAYERS):
            forward(batch, seq)
            shallow = meter.measure(partial(forward, batch, seq))
        depth.append({"batch": batch, "seq": seq, "full_depth": full, "two_layers": shallow})
        print(f"  depth {batch}x{seq}: full {full / MIB:.1f} MiB, two layers {shallow / MIB:.1f}")
    return {
        "dtype": encoder.info.dtype,
        "weights_bytes": weights,
        "make_resident_seconds": touch_s,
        "pass_4x256_seconds": min(times),
        "depth": depth,
        "measure_overhead_ms": measure_overhead(),
    }


def measure_overhead(repeats: int = 200) -> float:
    """What measuring one served pass adds, in this process (the model's size resident):
    trim, reset the high-water mark, read it back, trim. A pass on its own takes ms to s."""
    meter = PeakMeter()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        meter.measure_pass(lambda: None)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def black_box(
    server: Server, shapes: list[tuple[int, int]], vocab: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Each shape as one request of token ids; its peak read from the serving process."""
    pid = server.process.pid
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=server.url, timeout=3600) as http:
        info = http.get("/info").json()["memory"]
        a = info["cost_a_bytes_per_token"]
        b = info["cost_b_bytes_per_token2"]
        c = info["cost_c_bytes_per_pass"]
        workspace = info["per_forward_budget_bytes"]
        resident = info["model_resident_bytes"]
        rows = []
        for batch, seq in shapes:
            ids = rng.integers(10, vocab, size=(batch, seq)).tolist()
            reset_peak(pid)
            baseline = status_bytes(pid, "VmRSS")
            started = time.perf_counter()
            r = http.post("/v1/embeddings", json={"input": ids, "encoding_format": "base64"})
            r.raise_for_status()
            seconds = time.perf_counter() - started
            hwm = status_bytes(pid, "VmHWM")
            measured = hwm - baseline
            predicted = c + batch * seq * (a + b * seq)
            error = 100 * (predicted - measured) / measured
            rows.append(
                {
                    "batch": batch,
                    "seq": seq,
                    "measured": measured,
                    # the peak above the resident size the budget counts: larger by what the
                    # process has grown since startup (the headroom's job)
                    "measured_above_budgeted_resident": hwm - resident,
                    "rss_before": baseline,
                    "predicted": predicted,
                    "error_pct": error,
                    "share_of_workspace": measured / workspace,
                    "seconds": seconds,
                }
            )
            print(
                f"  held-out {batch}x{seq}: measured {measured / MIB:.1f} MiB, predicted "
                f"{predicted / MIB:.1f} MiB ({error:+.1f}%), {seconds:.1f}s",
                flush=True,
            )
    return rows


def _merged(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The earlier report with the runs measured now in place of its own (same machine)."""
    if earlier["machine"]["cpu"] != now["machine"]["cpu"]:
        raise SystemExit("--update: memory-m3.json was measured on another CPU")
    merged = {**earlier, "machine": now["machine"]}
    merged["m3"] = {**earlier.get("m3", {}), **now.get("m3", {})}
    merged["minilm"] = {**earlier.get("minilm", {}), **now.get("minilm", {})}
    return merged


def serve(
    model: str,
    dtype: str,
    limit: int,
    vocab: int,
    shapes: list[tuple[int, int]],
    max_seq: int | None = None,
) -> Any:
    """Cold start a server (empty probe cache), then measure the held-out shapes on it."""
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        server = Server(
            model,
            dtype,
            Path(cache),
            memory_limit_bytes=str(limit),
            max_batch_tokens=str(1 << 24),
            request_timeout_s="3600",
            **({"max_seq_length": str(max_seq)} if max_seq else {}),
        )
        ready_s = time.perf_counter() - started
        try:
            health = httpx.get(server.url + "/health").json()
            print(
                f"  cold start to ready {ready_s:.1f}s (probe {health['probe_seconds']:.1f}s), "
                f"a={health['cost_a_bytes_per_token']:.0f} "
                f"b={health['cost_b_bytes_per_token2']:.3f} "
                f"c={health['cost_c_bytes_per_pass']:.0f}",
                flush=True,
            )
            held = black_box(server, shapes, vocab)
            rss = status_bytes(server.process.pid, "VmRSS")
            drift = httpx.get(server.url + "/info").json()["memory"]["drift"]
        finally:
            server.stop()
    return {
        "cold_start_to_ready_seconds": ready_s,
        "health": health,
        "held_out": held,
        "rss_after_held_out": rss,
        "drift": drift,
    }


def summarise(held: list[dict[str, Any]]) -> dict[str, Any]:
    counted = [h for h in held if h["share_of_workspace"] >= 0.05]
    errors = [h["error_pct"] for h in counted]
    return {
        "counted": len(counted),
        "max_abs_error_pct": max((abs(e) for e in errors), default=None),
        "most_under_pct": min(errors, default=None),
        "mean_error_pct": statistics.fmean(errors) if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument(
        "--limit-gib",
        type=float,
        help="memory limit for the M3 server (default: 6 in fp32, 3 in bf16, whose passes "
        "cost half: the held-out shapes are then a like share of the workspace)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other runs of memory-m3.json, replace only those measured now",
    )
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--tables-only", action="store_true", help="regenerate the tables from memory-m3.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("memory-m3"))
        return
    model = m3_standin()
    report: dict[str, Any] = {
        "machine": machine(),
        "m3": {},
    }
    for dtype in args.dtypes.split(","):
        print(f"BGE-M3 stand-in, {dtype}", flush=True)
        if dtype == "bf16" and not report["machine"]["bf16_native"]:
            print("  bf16 is not native on this CPU (the server would serve fp32); skipped")
            report["m3"][dtype] = {"skipped": "no native bf16 on this CPU"}
            continue
        local = in_process(model, dtype)
        if local["dtype"] != dtype:
            print(f"  {dtype} is not native on this CPU (served {local['dtype']}); skipped")
            report["m3"][dtype] = {"skipped": f"no native {dtype} on this CPU"}
            continue
        limit = args.limit_gib or LIMIT_GIB[dtype]
        served = serve(str(model), dtype, int(limit * GIB), 250_002, M3_HELD_OUT)
        probe_s = served["health"]["probe_seconds"]
        report["m3"][dtype] = {
            **local,
            **served,
            "summary": summarise(served["held_out"]),
            "cold_start_in_passes": served["cold_start_to_ready_seconds"]
            / local["pass_4x256_seconds"],
            "probe_in_passes": probe_s / local["pass_4x256_seconds"],
        }
        print(json.dumps(report["m3"][dtype]["summary"]), flush=True)
    if not args.skip_minilm:
        report["minilm"] = {}
        for dtype in args.dtypes.split(","):
            if dtype == "bf16" and not report["machine"]["bf16_native"]:
                continue
            print(f"all-MiniLM-L6-v2, {dtype}", flush=True)
            served = serve("bundled", dtype, 2 * GIB, 30_522, MINILM_HELD_OUT, max_seq=512)
            report["minilm"][dtype] = {**served, "summary": summarise(served["held_out"])}
            print(json.dumps(report["minilm"][dtype]["summary"]), flush=True)
    if args.update:
        report = _merged(load_result("memory-m3"), report)
    save_result("memory-m3", report)
    write_tables(report)
    plot(report, result_path("memory-m3", ".png"))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
