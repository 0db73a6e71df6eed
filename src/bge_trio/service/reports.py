"""The bodies of ``/health`` and ``/info``: what the service, its startup and its
scheduler say about themselves, built in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bge_trio import __version__

if TYPE_CHECKING:  # the service passes itself in
    from bge_trio.service.embedding import EmbeddingService


def health(service: EmbeddingService) -> dict[str, object]:
    startup = service.startup
    status: str = startup.status
    if status == "ok" and not service.healthy:
        status = "unhealthy"
    if service.draining:
        status = "draining"
    body: dict[str, object] = {"status": status}
    if startup.status == "ok":
        stats = service.scheduler.statistics()
        body["consecutive_failures"] = stats.consecutive_failures
        body["queued_items"] = stats.queued_items
        body["queued_tokens"] = stats.queued_tokens
        body["requests_in_flight"] = service.requests_in_flight
    if startup.status == "probing" and startup.probe_progress is not None:
        step = startup.probe_progress
        body["probe_progress"] = {
            "shape": step.done,
            "of": step.total,
            "seconds": round(step.elapsed_s, 1),
            "estimate_remaining_s": round(step.remaining_s, 1),
        }
    if startup.error:
        body["error"] = startup.error
    if startup.memory is not None:
        body.update(startup.memory.report())
    return body


def describe(service: EmbeddingService) -> dict[str, Any]:
    """The server, the model, the memory model and the pace."""
    lanes, settings, cpu, startup = service.lanes, service.settings, service.cpu, service.startup
    body: dict[str, Any] = {
        "version": __version__,
        "status": startup.status,
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
    if startup.encoder is not None:
        info = startup.encoder.info
        body.update(
            {
                "model_id": info.name,
                "dimension": info.dimension,
                "max_seq_length": info.max_seq_length,
                "dtype": info.dtype,
                "dtype_reason": info.dtype_reason,
                "pooling": info.pooling,
                "outputs": sorted(info.outputs),
            }
        )
    if startup.memory is not None:
        body["memory"] = startup.memory.report()
        body["memory"]["drift"] = startup.recalibrator.statistics().report()
    body["speed"] = speed(service)
    return body


def speed(service: EmbeddingService) -> dict[str, object]:
    """What the scheduler has learnt about forward passes (None until measured)."""
    stats = service.scheduler.statistics()
    curve = stats.pace_curve
    sample = service.scheduler.predict_seconds(1, 512)
    return {
        "passes_observed": stats.passes_observed,
        "pass_overhead_ms": None if curve is None else round(curve[0] * 1000, 3),
        "pass_overhead_tokens": round(stats.pace_overhead_tokens, 1),
        "us_per_token": None if curve is None else round(curve[1] * 1e6, 3),
        "us_per_token_per_1k_length": None if curve is None else round(curve[2] * 1e9, 4),
        "tokens_per_s_at_512": None if sample is None else round(512 / sample, 1),
        "express_lane": {
            "max_tokens": service.lanes.express_tokens,
            "open": stats.express_open,
            "passes": stats.express_passes,
        },
        "passes_stopped_early": stats.passes_stopped_early,
    }
