"""Every error leaves the server as OpenAI-shaped JSON.

Domain errors (:mod:`bge_trio.errors`) map to HTTP in one table, ``TABLE``; HTTP's
own (no route, wrong method, body too large) keep their status. Client errors keep
their message; anything unexpected is logged with its stack trace and answered with
a generic 500 that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import orjson
from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from bge_trio import errors

log = logging.getLogger(__name__)


@attrs.frozen
class Shape:
    """What an error is on the wire."""

    status: int
    type: str


# The one place a domain error becomes HTTP (first match in the error's class order wins).
TABLE: dict[type[errors.ServiceError], Shape] = {
    errors.UnsupportedMediaType: Shape(415, "invalid_request_error"),
    errors.InvalidRequest: Shape(400, "invalid_request_error"),
    errors.TooLarge: Shape(413, "invalid_request_error"),
    errors.Unauthorized: Shape(401, "authentication_error"),
    errors.Overloaded: Shape(429, "rate_limit_exceeded"),
    errors.NotReady: Shape(503, "service_unavailable"),
    errors.ShuttingDown: Shape(503, "service_unavailable"),
    errors.ServerFailed: Shape(503, "server_error"),
    errors.BatchFailed: Shape(500, "server_error"),
    errors.TimedOut: Shape(504, "timeout_error"),
}

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _body(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: errors.ServiceError) -> Response:
    """The OpenAI-shaped answer to a domain error."""
    shape = next(TABLE[kind] for kind in type(error).__mro__ if kind in TABLE)
    headers: dict[str, str] = {}
    if isinstance(error, errors.Retryable):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    if isinstance(error, errors.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    message = error.message
    if isinstance(error, errors.BatchFailed):
        message = "internal server error"  # the cause stays in the log
    return json_response(_body(message, shape.type, error.param, error.code), shape.status, headers)


def register(app: Quart) -> None:
    @app.errorhandler(errors.ServiceError)
    async def on_service_error(error: errors.ServiceError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 404:
            message = "no such route; see GET /openapi.json or docs/api.md for the API"
        elif status == 405:
            message = "this method is not allowed on this route"
        elif status == 413:
            message = "the request body is larger than this server accepts"
        headers = {}
        allowed = getattr(error, "valid_methods", None)
        if status == 405 and allowed:
            headers["Allow"] = ", ".join(allowed)
        body = _body(message, "invalid_request_error", None, _HTTP_CODES.get(status))
        return json_response(body, status, headers)

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return json_response(_body("internal server error", "server_error", None, None), 500)
