"""Prometheus metrics, correct with several server processes.

With one process the default registry is served. When ``PROMETHEUS_MULTIPROC_DIR``
is set (``bge-trio serve --processes N`` sets it to a fresh directory), every
process writes its samples there and a scrape of any process aggregates all of
them; gauges say how (``livesum``: add up live processes; ``max``: the largest).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (64, 256, 1024, 4096, 16384, 65536, 262144)

REQUESTS = Counter("bge_trio_requests_total", "HTTP requests", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "bge_trio_request_seconds", "request latency", ["route"], buckets=_LATENCY
)
QUEUE_SECONDS = Histogram(
    "bge_trio_queue_wait_seconds", "time a text waits for its batch", buckets=_LATENCY
)
INFERENCE_SECONDS = Histogram("bge_trio_inference_seconds", "forward pass time", buckets=_LATENCY)
BATCH_SIZE = Histogram("bge_trio_batch_size", "texts per forward pass", buckets=_SIZES)
BATCH_TOKENS = Histogram("bge_trio_batch_tokens", "padded tokens per forward pass", buckets=_TOKENS)
BATCH_FAILURES = Counter("bge_trio_batch_failures_total", "forward passes that raised")
REQUESTS_IN_FLIGHT = Gauge(
    "bge_trio_requests_in_flight",
    "embedding and score requests accepted and not yet answered",
    multiprocess_mode="livesum",
)
QUEUED_ITEMS = Gauge("bge_trio_queued_items", "texts waiting", multiprocess_mode="livesum")
QUEUED_TOKENS = Gauge("bge_trio_queued_tokens", "tokens waiting", multiprocess_mode="livesum")
PROBE_STATUS = Gauge(
    "bge_trio_probe_status", "1 for the current probe status", ["status"], multiprocess_mode="max"
)
COST_A = Gauge("bge_trio_cost_a_bytes_per_token", "cost model a", multiprocess_mode="max")
COST_B = Gauge("bge_trio_cost_b_bytes_per_token2", "cost model b", multiprocess_mode="max")
COST_CORRECTION = Gauge(
    "bge_trio_cost_correction",
    "factor served passes put on the cost model",
    multiprocess_mode="max",
)
COST_C = Gauge("bge_trio_cost_c_bytes_per_pass", "cost model c", multiprocess_mode="max")
MEMORY_LIMIT = Gauge("bge_trio_memory_limit_bytes", "memory limit", multiprocess_mode="max")
FORWARD_BUDGET = Gauge(
    "bge_trio_forward_budget_bytes", "per-forward workspace", multiprocess_mode="max"
)
RESIDENT = Gauge(
    "bge_trio_process_resident_bytes", "resident memory of the process", multiprocess_mode="livesum"
)


class SchedulerMetrics:
    """What the scheduler reports about its batches and queue."""

    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None:
        BATCH_SIZE.observe(items)
        BATCH_TOKENS.observe(padded_tokens)
        for wait in waits_s:
            QUEUE_SECONDS.observe(wait)

    def batch_finished(self, seconds: float, ok: bool) -> None:
        INFERENCE_SECONDS.observe(seconds)
        if not ok:
            BATCH_FAILURES.inc()

    def queue_changed(self, items: int, tokens: int) -> None:
        QUEUED_ITEMS.set(items)
        QUEUED_TOKENS.set(tokens)


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape, aggregated across processes when configured."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
