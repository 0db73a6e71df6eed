"""Every error leaves the server as OpenAI-shaped JSON.

Client errors keep their message; anything unexpected is logged with its stack
trace and answered with a generic 500 that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from bge_trio.errors import ApiError

log = logging.getLogger(__name__)

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


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def register(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def on_api_error(error: ApiError) -> Response:
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
        return error_response(
            ApiError(status, message, code=_HTTP_CODES.get(status), headers=headers)
        )

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return error_response(ApiError(500, "internal server error", type="server_error"))
