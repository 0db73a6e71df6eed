"""Memory-model benchmark: probe time, cache-hit startup, held-out accuracy, batch utilisation.

    python -m benchmarks.memory [--model bundled] [--max-seq 512]

Prints a report, writes ``docs/results/memory-model.json`` (the numbers) and
``docs/results/memory-model.png`` (measured vs predicted peak memory).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from benchmarks.docs import result_path, save_result
from benchmarks.harness import machine
from benchmarks.reports.memory import plot, print_report
from bge_trio.cgroups import cpu_count
from bge_trio.config import Settings
from bge_trio.engine import prepare
from bge_trio.memory.cost import CostModel
from bge_trio.memory.plan import measure_budget, plan_memory, synthetic_forward
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process
from bge_trio.scheduler.batching import BatchPolicy, plan_batch

MIB = 1 << 20


def held_out_shapes(max_seq: int) -> list[tuple[int, int]]:
    """Shapes the probe never measures: other token counts, other lengths."""
    s = max_seq
    return [
        (3, s),
        (2, 3 * s // 4),
        (24, s // 5),
        (48, s // 3),
        (12, 3 * s // 8),
        (96, s // 12),
        (6, 7 * s // 8),
        (160, s // 16),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--max-seq", type=int, default=512)
    parser.add_argument("--allocator", default="predictable", choices=["predictable", "fast"])
    parser.add_argument("--budget-mib", type=int, default=256, help="workspace for utilisation")
    args = parser.parse_args()

    prepare_process(args.allocator)
    source = resolve_model(args.model)
    threads = cpu_count()
    started = time.perf_counter()
    encoder = load_encoder(source, max_seq_length=args.max_seq, dtype="fp32", threads=threads)
    load_s = time.perf_counter() - started
    budget = measure_budget(encoder, Settings(model=args.model, max_seq_length=args.max_seq))

    with tempfile.TemporaryDirectory() as cache_dir:
        settings = Settings(
            model=args.model,
            max_seq_length=args.max_seq,
            cache_dir=Path(cache_dir),
            probe="force",
            allocator=args.allocator,
        )
        plan = plan_memory(encoder, settings, budget, progress=None)
        assert plan.probe_seconds is not None
        cost = plan.cost

        # cache-hit start: the startup sequence again (model load + cache hit)
        hit_settings = attrs.evolve(settings, probe="auto")
        load_again = time.perf_counter()
        load_encoder(source, max_seq_length=args.max_seq, dtype="fp32", threads=threads)
        load_warm_s = time.perf_counter() - load_again
        start = time.perf_counter()
        prepared = prepare(hit_settings, source, threads=threads, workers=1)
        start_s = time.perf_counter() - start
        hit_status = prepared.memory.status

    # held-out accuracy
    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    held: list[dict[str, Any]] = []
    for b, s in held_out_shapes(args.max_seq):
        forward(b, s)
        measured = max(meter.measure(partial(forward, b, s)) for _ in range(3))
        predicted = cost.predict(b, s)
        held.append(
            {
                "batch": b,
                "seq": s,
                "measured": measured,
                "predicted": predicted,
                "error_pct": 100 * (measured - predicted) / predicted,
            }
        )

    utilisation = batch_utilisation(cost, args.budget_mib * MIB, encoder, args.max_seq)

    report = {
        "machine": machine(),
        "model": encoder.info.name,
        "allocator": args.allocator,
        "max_seq": args.max_seq,
        "probe_seconds": plan.probe_seconds,
        "probe_method": plan.method,
        "fit": {"a": cost.a, "b": cost.b, "c": cost.c},
        "fit_points": [
            {
                "batch": p.batch,
                "seq": p.seq,
                "measured": p.peak_bytes,
                "predicted": cost.predict(p.batch, p.seq),
            }
            for p in plan.points
        ],
        "model_load_seconds_cold": load_s,
        "model_load_seconds_warm": load_warm_s,
        "cache_hit_start_seconds": start_s,
        "cache_hit_status": hit_status,
        "held_out": held,
        "held_out_max_abs_error_pct": max(abs(h["error_pct"]) for h in held),
        "utilisation": utilisation,
    }
    print_report(report)
    save_result("memory-model", report)
    plot(report, result_path("memory-model", ".png"))


def batch_utilisation(
    cost: CostModel, workspace: int, encoder: Encoder, max_seq: int
) -> dict[str, Any]:
    """Plan batches from a queue of mixed lengths; how full is each, predicted and measured?"""
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(8, 32, 300), rng.integers(64, max_seq + 1, 200)])
    rng.shuffle(lengths)
    queue = lengths.tolist()
    policy = BatchPolicy(cost, workspace)
    shares, measured_shares = [], []
    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    batches = 0
    while queue:
        chosen = plan_batch(queue, policy)
        picked = [queue[i] for i in chosen]
        b, s = len(picked), max(picked)
        shares.append(cost.predict(b, s) / workspace)
        if batches < 6:  # measure the first few for real
            measured_shares.append(meter.measure(partial(forward, b, s)) / workspace)
        batches += 1
        keep = set(chosen)
        queue = [x for i, x in enumerate(queue) if i not in keep]
    return {
        "workspace_bytes": workspace,
        "batches": batches,
        "texts": len(lengths),
        "predicted_share_mean": float(np.mean(shares)),
        "predicted_share_max": float(np.max(shares)),
        "measured_share_max": float(np.max(measured_shares)),
        "measured_share_mean_first_batches": float(np.mean(measured_shares)),
    }


if __name__ == "__main__":
    main()
