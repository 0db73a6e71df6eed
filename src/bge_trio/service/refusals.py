"""The domain errors the service answers with when the scheduler refuses or fails work."""

from __future__ import annotations

from bge_trio.errors import (
    BatchFailed,
    Overloaded,
    ServerFailed,
    ServiceError,
    ShuttingDown,
    TooLarge,
)
from bge_trio.scheduler.scheduler import (
    BatchFailedError,
    QueueFullError,
    ShuttingDownError,
    TooSlowError,
)


def server_failed() -> ServerFailed:
    """Startup failed for good, or the scheduler crashed: the process is about to exit."""
    return ServerFailed(
        "the server has failed and is shutting down; see its log", code="server_failed"
    )


def shutting_down() -> ShuttingDown:
    """The process is stopping: another replica (or this one, restarted) will answer."""
    return ShuttingDown(
        "the server is shutting down; retry the request (another replica will answer it)",
        retry_after_s=1,
        code="shutting_down",
    )


def refusal(exc: Exception, failed: bool) -> ServiceError | None:
    """The answer to the scheduler's ``exc`` (``failed``: the server has failed for good)."""
    if isinstance(exc, BatchFailedError):
        return server_failed() if failed else BatchFailed("a forward pass failed")
    if isinstance(exc, QueueFullError):
        return Overloaded(
            f"the server is at capacity ({exc}); retry after a short wait",
            retry_after_s=exc.retry_after_s,
            code="queue_full",
        )
    if isinstance(exc, TooSlowError) and exc.index is None:
        return TooLarge(
            f"this request's {exc.texts} texts ({exc.tokens} tokens) would take about "
            f"{exc.estimate_s:.0f} s at this server's measured pace even on an idle server, "
            f"more than the request deadline of {exc.deadline_s:g} s. Send them in several "
            "smaller requests, or raise BGE_TRIO_REQUEST_TIMEOUT_S",
            param="input",
            code="request_too_slow_for_deadline",
        )
    if isinstance(exc, TooSlowError):
        return TooLarge(
            f"input[{exc.index}] has {exc.tokens} tokens; at this server's measured pace it "
            f"would take about {exc.estimate_s:.0f} s, more than the request deadline of "
            f"{exc.deadline_s:g} s. Send a shorter text (or its parts in separate requests), "
            "or raise BGE_TRIO_REQUEST_TIMEOUT_S",
            param="input",
            code="input_too_slow_for_deadline",
        )
    if isinstance(exc, ShuttingDownError):
        return shutting_down()
    return None
