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
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.docs import load_result, result_path, save_result, write_block
from benchmarks.harness import Server, cpu_name
from bge_trio.cgroups import cpu_count
from bge_trio.memory.plan import PROBE_LAYERS, synthetic_forward
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.loading import bf16_supported, load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process
from bge_trio.testing import build_full_m3

MIB = 1 << 20
GIB = 1 << 30
LIMIT_GIB = {"fp32": 6.0, "bf16": 3.0}
MODELS = Path.home() / ".cache" / "bge-trio" / "bench"

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


def standin() -> Path:
    directory = MODELS / "bge-m3-standin"
    if not (directory / "model.safetensors").is_file():
        print(f"building the full-size stand-in in {directory} ...", flush=True)
        build_full_m3(directory)
    return directory


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


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(field)


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
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            baseline = _status(pid, "VmRSS")
            started = time.perf_counter()
            r = http.post("/v1/embeddings", json={"input": ids, "encoding_format": "base64"})
            r.raise_for_status()
            seconds = time.perf_counter() - started
            hwm = _status(pid, "VmHWM")
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
            rss = _status(server.process.pid, "VmRSS")
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
    model = standin()
    report: dict[str, Any] = {
        "machine": {
            "cpu": cpu_name(),
            "threads": cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "bf16_native": bf16_supported(),
        },
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


def write_tables(report: dict[str, Any]) -> None:
    """The tables, in docs/memory-model.md between its markers."""
    text = table(report)
    write_block("memory-model.md", "memory-m3-table", text)


def table(report: dict[str, Any]) -> str:
    """The markdown tables docs/memory-model.md shows, generated from the report."""
    m = report["machine"]
    out = [
        f"<!-- generated by `python -m benchmarks.m3` from memory-m3.json; do not edit -->\n"
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, native bf16: "
        f"{'yes' if m['bf16_native'] else 'no'}.\n",
        "| BGE-M3 stand-in | " + " | ".join(report["m3"]) + " |",
        "| --- | " + " | ".join("---" for _ in report["m3"]) + " |",
    ]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("one 4 x 256 pass, full depth (s)", lambda r: f"{r['pass_4x256_seconds']:.2f}"),
        ("probe (s)", lambda r: f"{r['health']['probe_seconds']:.1f}"),
        ("cold start to ready (s)", lambda r: f"{r['cold_start_to_ready_seconds']:.1f}"),
        ("cold start in 4 x 256 passes", lambda r: f"{r['cold_start_in_passes']:.1f}"),
        ("probe in 4 x 256 passes", lambda r: f"{r['probe_in_passes']:.1f}"),
        ("a (bytes/token)", lambda r: f"{r['health']['cost_a_bytes_per_token']:.0f}"),
        ("b (bytes/token²)", lambda r: f"{r['health']['cost_b_bytes_per_token2']:.3f}"),
        ("c (bytes/pass)", lambda r: f"{r['health']['cost_c_bytes_per_pass']:.0f}"),
        ("held-out passes ≥ 5 % of workspace", lambda r: f"{r['summary']['counted']}"),
        ("held-out max \\|error\\| (%)", lambda r: _pct(r["summary"]["max_abs_error_pct"])),
        ("held-out most under (%)", lambda r: _pct(r["summary"]["most_under_pct"])),
        ("weights (MiB)", lambda r: f"{r['weights_bytes'] / MIB:.0f}"),
        ("budgeted resident (MiB)", lambda r: f"{r['health']['model_resident_bytes'] / MIB:.0f}"),
        ("RSS after the held-out passes (MiB)", lambda r: f"{r['rss_after_held_out'] / MIB:.0f}"),
        ("copying weights into memory (s)", lambda r: f"{r['make_resident_seconds']:.2f}"),
        ("measuring one served pass (ms)", lambda r: f"{r['measure_overhead_ms']:.2f}"),
    ]
    for label, cell in rows:
        cells = [cell(r) if "health" in r else r.get("skipped", "") for r in report["m3"].values()]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for dtype, r in report["m3"].items():
        if "depth" not in r:
            continue
        out += [
            f"\nTwo-layer probe against full depth, {dtype}:\n",
            "| shape | full depth MiB | two layers MiB | difference |",
            "| --- | --- | --- | --- |",
        ]
        for d in r["depth"]:
            diff = 100 * (d["two_layers"] - d["full_depth"]) / d["full_depth"]
            out.append(
                f"| {d['batch']} x {d['seq']} | {d['full_depth'] / MIB:.1f} | "
                f"{d['two_layers'] / MIB:.1f} | {diff:+.1f} % |"
            )
    runs = [(f"BGE-M3 stand-in {d}", r) for d, r in report["m3"].items() if "held_out" in r]
    runs += [(f"all-MiniLM-L6-v2 {d}", r) for d, r in report.get("minilm", {}).items()]
    for title, r in runs:
        h = r["health"]
        out += [
            f"\nHeld-out shapes, {title} (black-box on the serving process; workspace "
            f"{h['per_forward_budget_bytes'] / MIB:.0f} MiB):\n",
            "| shape | measured MiB | predicted MiB | error | share of workspace | "
            "above budgeted resident MiB | error against it |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x in r["held_out"]:
            above = x["measured_above_budgeted_resident"]
            out.append(
                f"| {x['batch']} x {x['seq']} | {x['measured'] / MIB:.1f} | "
                f"{x['predicted'] / MIB:.1f} | {x['error_pct']:+.1f} % | "
                f"{100 * x['share_of_workspace']:.1f} % | {above / MIB:.1f} | "
                f"{100 * (x['predicted'] - above) / above:+.1f} % |"
            )
    return "\n".join(out) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(f"BGE-M3 {d}", r) for d, r in report["m3"].items() if "held_out" in r]
    runs += [(f"MiniLM {d}", r) for d, r in report.get("minilm", {}).items()]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.8), squeeze=False)
    for ax, (title, run) in zip(axes[0], runs, strict=True):
        held = run["held_out"]
        xs = [h["measured"] / MIB for h in held]
        ys = [h["predicted"] / MIB for h in held]
        ax.scatter(xs, ys, marker="s", label="held-out shapes (served, black-box)")
        for h, x, y in zip(held, xs, ys, strict=True):
            ax.annotate(
                f"{h['batch']}x{h['seq']}",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        top = max(xs + ys) * 1.08
        ax.plot([0, top], [0, top], "k--", linewidth=0.8, label="predicted = measured")
        ax.plot([0, top], [0, top * 1.1], ":", color="grey", linewidth=0.8, label="+10 %")
        ax.plot([0, top], [0, top * 0.95], ":", color="red", linewidth=0.8, label="-5 %")
        ax.set_xlabel("measured peak above baseline (MiB)")
        ax.set_ylabel("predicted (MiB)")
        ax.set_title(f"{title}: probe {run['health']['probe_seconds']:.1f}s", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
