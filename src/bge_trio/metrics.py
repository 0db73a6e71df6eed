"""Prometheus metrics, correct with several server processes.

With one process the default registry is served. When ``PROMETHEUS_MULTIPROC_DIR``
is set (``bge-trio serve --processes N`` sets it to a fresh directory), every
process writes its samples there and a scrape of any process aggregates all of
them; gauges say how (``livesum``: add up live processes; ``max``: the largest).
What belongs to a served model (its passes, queue, memory plan, requests in flight)
carries a ``model`` label; what belongs to a route, the route's.
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
    "bge_trio_queue_wait_seconds", "time a text waits for its batch", ["model"], buckets=_LATENCY
)
INFERENCE_SECONDS = Histogram(
    "bge_trio_inference_seconds", "forward pass time", ["model"], buckets=_LATENCY
)
BATCH_SIZE = Histogram("bge_trio_batch_size", "texts per forward pass", ["model"], buckets=_SIZES)
BATCH_TOKENS = Histogram(
    "bge_trio_batch_tokens", "padded tokens per forward pass", ["model"], buckets=_TOKENS
)
BATCH_FAILURES = Counter("bge_trio_batch_failures_total", "forward passes that raised", ["model"])
REQUESTS_IN_FLIGHT = Gauge(
    "bge_trio_requests_in_flight",
    "embedding and score requests accepted and not yet answered",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUED_ITEMS = Gauge(
    "bge_trio_queued_items", "texts waiting", ["model"], multiprocess_mode="livesum"
)
QUEUED_TOKENS = Gauge(
    "bge_trio_queued_tokens", "tokens waiting", ["model"], multiprocess_mode="livesum"
)
PROBE_STATUS = Gauge(
    "bge_trio_probe_status",
    "1 for the current probe status",
    ["model", "status"],
    multiprocess_mode="max",
)
COST_A = Gauge(
    "bge_trio_cost_a_bytes_per_token", "cost model a", ["model"], multiprocess_mode="max"
)
COST_B = Gauge(
    "bge_trio_cost_b_bytes_per_token2", "cost model b", ["model"], multiprocess_mode="max"
)
COST_CORRECTION = Gauge(
    "bge_trio_cost_correction",
    "factor served passes put on the cost model",
    ["model"],
    multiprocess_mode="max",
)
COST_C = Gauge("bge_trio_cost_c_bytes_per_pass", "cost model c", ["model"], multiprocess_mode="max")
MEMORY_LIMIT = Gauge(
    "bge_trio_memory_limit_bytes", "memory limit", ["model"], multiprocess_mode="max"
)
FORWARD_BUDGET = Gauge(
    "bge_trio_forward_budget_bytes", "per-forward workspace", ["model"], multiprocess_mode="max"
)
RESIDENT = Gauge(
    "bge_trio_process_resident_bytes", "resident memory of the process", multiprocess_mode="livesum"
)


class SchedulerMetrics:
    """What one model's scheduler reports about its batches, queue and cost model."""

    def __init__(self, model: str) -> None:
        self._model = model

    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None:
        model = self._model
        BATCH_SIZE.labels(model).observe(items)
        BATCH_TOKENS.labels(model).observe(padded_tokens)
        for wait in waits_s:
            QUEUE_SECONDS.labels(model).observe(wait)

    def batch_finished(self, seconds: float, ok: bool) -> None:
        INFERENCE_SECONDS.labels(self._model).observe(seconds)
        if not ok:
            BATCH_FAILURES.labels(self._model).inc()

    def queue_changed(self, items: int, tokens: int) -> None:
        QUEUED_ITEMS.labels(self._model).set(items)
        QUEUED_TOKENS.labels(self._model).set(tokens)

    def correction_changed(self, factor: float) -> None:
        COST_CORRECTION.labels(self._model).set(factor)


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape, aggregated across processes when configured."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
