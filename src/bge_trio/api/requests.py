"""What every route does with a request: find its engine, read its body, bound it by
the deadlines, record what it carried, and wrap results in the OpenAI list envelope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from quart import current_app, g, request

from bge_trio.api import schemas
from bge_trio.config import Settings
from bge_trio.engine import Engine, Engines
from bge_trio.errors import TimedOut
from bge_trio.model.transformer import Kind

T = TypeVar("T")


def engines() -> Engines:
    """The app's engines (set by ``create_app``)."""
    found: Engines = current_app.extensions["bge_trio"]
    return found


def settings() -> Settings:
    """The server's settings (every engine's, with one model)."""
    return engines().default.settings


def engine_for(payload: dict[str, Any], *, check: bool = True, kind: Kind | None = None) -> Engine:
    """The engine of the model the body names, which must be of ``kind`` (when it names
    none: the first of ``kind``); ``check``: ``model`` and ``user`` must be strings, as
    on the OpenAI-shaped routes."""
    if check:
        schemas.check_model(payload)
    model = payload.get("model")
    return engines().find(model if isinstance(model, str) else None, kind)


def startup_deadline() -> float:
    """Until when a request waits for the model to load and its memory to be measured:
    ``BGE_TRIO_STARTUP_WAIT_S`` from now, the request's arrival."""
    return trio.current_time() + settings().startup_wait_s


async def body() -> dict[str, Any]:
    raw = await request.get_data()
    g.body_read = True  # the connection can serve the next request (see hooks)
    data = raw.encode() if isinstance(raw, str) else raw
    return schemas.parse_json_body(request.headers.get("Content-Type"), data)


async def within_deadline(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn`` under the request deadline; past it, queued texts are dropped (504)."""
    limit = settings().request_timeout_s
    with trio.move_on_after(limit):
        return await fn(*args)
    raise TimedOut(
        f"the request did not finish within {limit:g} s; retry, or send fewer texts",
        code="request_timeout",
    )


def envelope(
    data: list[dict[str, Any]], prompt_tokens: int, model: str, **extra: Any
) -> dict[str, Any]:
    """OpenAI's list envelope, with the tokens embedded as its usage."""
    return {
        "object": "list",
        "data": data,
        "model": model,
        **extra,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def note_usage(inputs: int, tokens: int, queue_s: float | None, inference_s: float | None) -> None:
    """Record what the request carried and where its time went, for its log line."""
    g.inputs = inputs
    g.tokens = tokens
    if queue_s is not None and inference_s is not None:
        g.queue_ms = round(queue_s * 1000, 2)
        g.inference_ms = round(inference_s * 1000, 2)
