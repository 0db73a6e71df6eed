"""What every route does with a request: read its body, bound it by the deadline,
record what it carried, and wrap results in the OpenAI list envelope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from quart import current_app, g, request

from bge_trio.api import schemas
from bge_trio.errors import TimedOut
from bge_trio.scheduler.scheduler import Timing
from bge_trio.service import EmbeddingService

T = TypeVar("T")


def service() -> EmbeddingService:
    """The app's service (set by ``create_app``)."""
    found: EmbeddingService = current_app.extensions["bge_trio"]
    return found


async def body() -> dict[str, Any]:
    raw = await request.get_data()
    g.body_read = True  # the connection can serve the next request (see hooks)
    data = raw.encode() if isinstance(raw, str) else raw
    return schemas.parse_json_body(request.headers.get("Content-Type"), data)


async def within_deadline(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn`` under the request deadline; past it, queued texts are dropped (504)."""
    limit = service().settings.request_timeout_s
    with trio.move_on_after(limit):
        return await fn(*args)
    raise TimedOut(
        f"the request did not finish within {limit:g} s; retry, or send fewer texts",
        code="request_timeout",
    )


def envelope(data: list[dict[str, Any]], prompt_tokens: int, **extra: Any) -> dict[str, Any]:
    """OpenAI's list envelope, with the tokens embedded as its usage."""
    return {
        "object": "list",
        "data": data,
        "model": service().info.name,
        **extra,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def note_usage(inputs: int, tokens: int, timing: Timing | None = None) -> None:
    """Record what the request carried and where its time went, for its log line."""
    g.inputs = inputs
    g.tokens = tokens
    if timing is not None:
        g.queue_ms = round(timing.queue_s * 1000, 2)
        g.inference_ms = round(timing.inference_s * 1000, 2)
