"""Errors a client can act on, named for what went wrong, not for HTTP.

The service and the request parsers raise these; only the API layer decides what
each becomes on the wire (one table in :mod:`bge_trio.api.errors`: status, the
OpenAI error ``type``, and headers such as ``Retry-After``). Anything else that
escapes is an internal failure and becomes a generic 500.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure with a message meant for the client, the field at fault, and a code."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServiceError):
    """The request must change: a bad field, a bad body, an input over a limit."""


class UnsupportedMediaType(InvalidRequest):
    """The body is not JSON by its Content-Type."""


class TooLarge(ServiceError):
    """One input is larger than this server can take: its memory, or its deadline."""


class Unauthorized(ServiceError):
    """The API key is missing or wrong."""


class Retryable(ServiceError):
    """The request was fine; retry it after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class Overloaded(Retryable):
    """The queue is full, or the request would wait past its deadline behind it."""


class NotReady(Retryable):
    """The model is still loading, or the memory probe still running."""


class ShuttingDown(Retryable):
    """The process is stopping; another replica will answer."""


class ServerFailed(ServiceError):
    """Startup failed for good, or the scheduler crashed: the process is about to exit."""


class BatchFailed(ServiceError):
    """A forward pass raised; the cause is in the log, not for the client."""


class TimedOut(ServiceError):
    """The request did not finish within its deadline."""


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> InvalidRequest:
    """A request the client must change."""
    return InvalidRequest(message, param=param, code=code)
