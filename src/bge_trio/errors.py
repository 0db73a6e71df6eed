"""Errors a client can act on, named for what went wrong, not for HTTP.

Each is raised once, where what went wrong is known: the request parsers, the input
rules, the scheduler (queue full, too slow for the deadline, shutting down, a failed
pass, the model not ready in time). Only the edges translate: the API layer's one table
(:mod:`bge_trio.api.errors`: status, the OpenAI error ``type``, headers such as
``Retry-After``) and the one line a command prints. An error about one input says which
(``index``) and carries the numbers its message was made from, so another edge (the bulk
job, which speaks of "the text", not ``input[3]``) can say it in its own words. Anything
else that escapes is an internal failure and becomes a generic 500.
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
    """One input, or the request, is larger than this server can take: its memory, or its
    deadline."""


class InputTooLong(ServiceError):
    """One input is longer than the server takes: the model's maximum (``reason``
    ``"model"``) or what fits the memory budget in one pass (``"memory"``).

    ``index`` is the input's place in the request, ``tokens`` its length and ``limit`` the
    longest that would have been taken."""

    def __init__(
        self, message: str, *, index: int, tokens: int, limit: int, reason: str, code: str
    ) -> None:
        super().__init__(message, param="input", code=code)
        self.index = index
        self.tokens = tokens
        self.limit = limit
        self.reason = reason

    def about(self, subject: str) -> str:
        """The same refusal told of ``subject`` (``"the text"``) instead of ``input[i]``."""
        return self.message.replace(f"input[{self.index}]", subject, 1)


class ContextLengthExceeded(InputTooLong, InvalidRequest):
    """Longer than the model's maximum: a 400, as OpenAI answers it."""


class InputTooLarge(InputTooLong, TooLarge):
    """Longer than fits the memory budget in one pass: a 413."""


class TooSlow(TooLarge):
    """One text (``index``), or the whole request (``index`` None), would run past the
    request deadline at the measured pace, even on an idle server: refused before it runs."""

    def __init__(
        self, message: str, *, index: int | None, tokens: int, estimate_s: float, deadline_s: float
    ) -> None:
        code = "request_too_slow_for_deadline" if index is None else "input_too_slow_for_deadline"
        super().__init__(message, param="input", code=code)
        self.index = index
        self.tokens = tokens
        self.estimate_s = estimate_s
        self.deadline_s = deadline_s


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
    """A forward pass raised; the cause is in the log (and on ``__cause__``), not for the
    client."""


class TimedOut(ServiceError):
    """The request did not finish within its deadline."""


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> InvalidRequest:
    """A request the client must change."""
    return InvalidRequest(message, param=param, code=code)


def not_ready(state: str) -> NotReady:
    """The model is still loading, or its memory still being measured."""
    return NotReady(f"the model is still {state}; retry shortly", retry_after_s=5, code="not_ready")


def gate_closed() -> NotReady:
    """Texts waited their startup wait at the closed gate: the memory is still being
    measured (the gate is closed only then)."""
    return NotReady("the server is still probing; retry shortly", retry_after_s=5, code="not_ready")


def shutting_down() -> ShuttingDown:
    """The process is stopping: another replica (or this one, restarted) will answer."""
    return ShuttingDown(
        "the server is shutting down; retry the request (another replica will answer it)",
        retry_after_s=1,
        code="shutting_down",
    )


def server_failed() -> ServerFailed:
    """Startup failed for good, or the scheduler crashed: the process is about to exit."""
    return ServerFailed(
        "the server has failed and is shutting down; see its log", code="server_failed"
    )


def batch_failed() -> BatchFailed:
    """A forward pass raised (its exception is the cause, for the log)."""
    return BatchFailed("a forward pass failed", code=None)
