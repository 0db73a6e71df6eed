"""The bodies of ``/health`` and ``/info``, built from an engine's statistics snapshot
alone (nothing here reaches into the engine)."""

from __future__ import annotations

from typing import Any

from bge_trio import __version__
from bge_trio.config import Settings
from bge_trio.engine import EngineStatistics
from bge_trio.engine.state import Loading, Probing, Ready
from bge_trio.scheduler.pace import PassPace


def health(stats: EngineStatistics) -> dict[str, object]:
    status = stats.state.status
    if isinstance(stats.state, Ready) and not stats.healthy:
        status = "unhealthy"
    if stats.draining:
        status = "draining"
    body: dict[str, object] = {"status": status}
    scheduler = stats.scheduler
    if isinstance(stats.state, Ready) and scheduler is not None:
        body["consecutive_failures"] = scheduler.consecutive_failures
        body["queued_items"] = scheduler.queued_items
        body["queued_tokens"] = scheduler.queued_tokens
        body["requests_in_flight"] = stats.requests_in_flight
    if isinstance(stats.state, Loading) and stats.state.step is not None:
        body["loading_step"] = stats.state.step
    if isinstance(stats.state, Probing) and stats.state.progress is not None:
        step = stats.state.progress
        body["probe_progress"] = {
            "shape": step.done,
            "of": step.total,
            "seconds": round(step.elapsed_s, 1),
            "estimate_remaining_s": round(step.remaining_s, 1),
        }
    reason = getattr(stats.state, "reason", None)
    if reason:
        body["error"] = reason
    if stats.memory is not None:
        body.update(stats.memory.report())
    return body


def describe(stats: EngineStatistics, settings: Settings) -> dict[str, Any]:
    """The server, the model, the memory model and the pace."""
    lanes, cpu = stats.lanes, stats.cpu
    body: dict[str, Any] = {
        "version": __version__,
        "status": stats.state.status,
        "workers": lanes.workers,
        "threads_per_pass": lanes.threads,
        "express_lane": {
            "max_tokens": lanes.express_tokens,
            "threads": lanes.express_threads,
            "regular_threads_beside_it": lanes.shared_threads,
        },
        "processes": settings.processes,
        "max_batch": settings.max_batch,
        "long_input": settings.long_input,
        "truncate": settings.long_input == "truncate",
        "cpu": {
            "threads": cpu.threads,
            "cpus": cpu.cpus,
            "affinity": cpu.affinity,
            "source": cpu.source,
        },
    }
    info = stats.info
    if info is not None:
        body.update(
            {
                "model_id": info.name,
                "kind": info.kind,
                "dimension": info.dimension,
                "max_seq_length": info.max_seq_length,
                "dtype": info.dtype,
                "dtype_reason": info.dtype_reason,
                "backend": info.backend,
                "pooling": info.pooling,
                "outputs": sorted(info.outputs),
            }
        )
    scheduler = stats.scheduler
    if stats.memory is not None:
        body["memory"] = stats.memory.report()
        if scheduler is not None:
            body["memory"]["drift"] = scheduler.drift.report()
    body["speed"] = speed(stats)
    return body


def speed(stats: EngineStatistics) -> dict[str, object]:
    """What the scheduler has learnt about forward passes (None until measured)."""
    scheduler = stats.scheduler
    curve = None if scheduler is None else scheduler.pace_curve
    sample = stats.tokens_per_s_at_512
    return {
        "passes_observed": 0 if scheduler is None else scheduler.passes_observed,
        "pass_overhead_ms": None if curve is None else round(curve[0] * 1000, 3),
        "pass_overhead_tokens": round(
            PassPace().overhead_tokens if scheduler is None else scheduler.pace_overhead_tokens, 1
        ),
        "us_per_token": None if curve is None else round(curve[1] * 1e6, 3),
        "us_per_token_per_1k_length": None if curve is None else round(curve[2] * 1e9, 4),
        "tokens_per_s_at_512": None if sample is None else round(sample, 1),
        "express_lane": {
            "max_tokens": stats.lanes.express_tokens,
            "open": False if scheduler is None else scheduler.express_open,
            "passes": 0 if scheduler is None else scheduler.express_passes,
        },
        "passes_stopped_early": 0 if scheduler is None else scheduler.passes_stopped_early,
    }
