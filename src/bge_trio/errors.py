"""Errors a client can act on, in the OpenAI shape.

Any layer may raise :class:`ApiError`; the HTTP layer turns it into
``{"error": {"message", "type", "param", "code"}}`` with its status. Anything else
that escapes is an internal failure and becomes a generic 500.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failure with an HTTP status and a message meant for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a request the client must change."""
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, retry_after_s: int) -> ApiError:
    """A 503 the client may retry after ``retry_after_s`` seconds."""
    return ApiError(
        503,
        message,
        type="service_unavailable",
        code="not_ready",
        headers={"Retry-After": str(retry_after_s)},
    )
