"""``bge-trio probe``: the memory probe in the foreground, with a table of what it measured.

It runs the server's own startup sequence (:func:`~bge_trio.engine.prepare`) with the
server's lanes, so the probe cache entry it writes is the one a server with the same
settings starts from."""

from __future__ import annotations

import sys

import attrs

from bge_trio.cgroups import cpu_count
from bge_trio.config import Settings
from bge_trio.engine import prepare
from bge_trio.engine.backend import express_tokens
from bge_trio.memory.plan import MemoryTooSmallError
from bge_trio.memory.probe import ProbeProgress
from bge_trio.model.source import ModelSource
from bge_trio.scheduler.lanes import plan_lanes

MIB = 1024 * 1024


def run_probe_command(settings: Settings, source: ModelSource) -> int:
    out = sys.stdout
    lanes = plan_lanes(cpu_count(), settings.workers, express_tokens(settings))
    print(f"loading {source.path} ...", file=out, flush=True)

    def progress(step: ProbeProgress) -> None:
        point = step.point
        print(
            f"  [{step.done}/{step.total}] batch {point.batch:>4} x seq {point.seq:>5}: "
            f"{point.peak_bytes / MIB:9.1f} MiB  ({step.elapsed_s:.1f}s, "
            f"~{step.remaining_s:.0f}s to go)",
            file=out,
            flush=True,
        )

    forced = attrs.evolve(settings, probe="force", cost_a=None, cost_b=None)
    try:
        prepared = prepare(
            forced, source, threads=lanes.threads, workers=lanes.workers, progress=progress
        )
    except MemoryTooSmallError as exc:
        print(f"bge-trio: {exc}", file=sys.stderr)
        return 3
    plan = prepared.memory
    limit = plan.budget.limit
    print(
        f"\nmemory limit {limit.bytes / MIB:.0f} MiB ({limit.source}); model resident "
        f"{plan.budget.model_resident_bytes / MIB:.0f} MiB; per-forward budget "
        f"{plan.budget.workspace_bytes / MIB:.0f} MiB",
        file=out,
    )
    print(f"status {plan.status} ({plan.method or 'no measurement'})", file=out)
    if plan.probe_seconds is not None:
        print(f"probe took {plan.probe_seconds:.2f}s", file=out)
    if plan.points:
        print(
            f"\n{'batch':>6} {'seq':>6} {'measured MiB':>13} {'predicted MiB':>14} "
            f"{'residual MiB':>13} {'error %':>8}",
            file=out,
        )
        for point, residual in zip(plan.points, plan.residuals, strict=True):
            predicted = plan.cost.predict(point.batch, point.seq)
            print(
                f"{point.batch:>6} {point.seq:>6} {point.peak_bytes / MIB:>13.2f} "
                f"{predicted / MIB:>14.2f} {residual / MIB:>13.2f} "
                f"{100 * residual / predicted if predicted else 0:>8.1f}",
                file=out,
            )
    print(
        f"\nfit: a = {plan.cost.a:.1f} bytes/token, b = {plan.cost.b:.3f} bytes/token^2, "
        f"c = {plan.cost.c:.0f} bytes/pass",
        file=out,
    )
    if plan.detail:
        print(f"detail: {plan.detail}", file=out)
    return 0 if plan.status == "complete" else 1
