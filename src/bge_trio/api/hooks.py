"""Per-request concerns around every route: the API key, the request id, metrics, the log line.

Each request gets an id (the client's ``x-request-id`` when it sends one, else a
new one), echoed in the response. When it ends, one structured log line records
the route, the status, the inputs and tokens it carried, and how long it took.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from quart import Quart, Response, g, request

from bge_trio import metrics
from bge_trio.errors import Unauthorized

log = logging.getLogger("bge_trio.access")

OPEN_PATHS = frozenset({"/live", "/health"})
_MAX_ID = 128


def install(app: Quart, api_key: str | None) -> None:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.before_request
    async def start() -> None:
        supplied = request.headers.get("x-request-id", "")
        g.request_id = supplied[:_MAX_ID] if supplied.isprintable() and supplied else None
        g.request_id = g.request_id or uuid.uuid4().hex
        g.started = time.perf_counter()
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized(
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )

    @app.after_request
    async def finish(response: Response) -> Response:
        request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
        response.headers["x-request-id"] = request_id
        if _has_body() and not getattr(g, "body_read", False):
            # hypercorn cannot reuse a connection whose request body nobody read (refused
            # before reading, or a body sent to a GET): the next request on it would wait
            # forever. Close it; the client reconnects.
            response.headers["Connection"] = "close"
        seconds = time.perf_counter() - getattr(g, "started", time.perf_counter())
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.REQUESTS.labels(rule, str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(rule).observe(seconds)
        if rule not in ("/live", "/health", "/metrics"):
            log.info(
                "%s %s %d",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "request_id": request_id,
                    "route": rule,
                    "status": response.status_code,
                    "inputs": getattr(g, "inputs", None),
                    "tokens": getattr(g, "tokens", None),
                    "queue_ms": getattr(g, "queue_ms", None),
                    "inference_ms": getattr(g, "inference_ms", None),
                    "ms": round(seconds * 1000, 2),
                },
            )
        return response


def _has_body() -> bool:
    length = request.headers.get("Content-Length", "0")
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return chunked or (length.isdigit() and int(length) > 0)
