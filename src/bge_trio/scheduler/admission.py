"""Admission: whether a request's texts may join the queue, judged by time.

Time comes from the learnt pace ``(t0, t1, t2)``: a pass of padded length S over
n tokens takes about ``t0 + t1·n + t2·n·S`` seconds (see :mod:`.pace`). A request
that would wait longer than its deadline is better refused now (429, retry
elsewhere) than accepted and timed out later (504, work wasted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.lanes import Lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.queue import WorkQueue

Curve = tuple[float, float, float]


class QueueFullError(RuntimeError):
    """Admitting the request would take the queue past its bound (a 429 for the client)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooSlowError(RuntimeError):
    """One text of the request alone would run past the deadline (a 413 for the client)."""

    def __init__(self, index: int, tokens: int, estimate_s: float, deadline_s: float) -> None:
        super().__init__(f"input[{index}] would take about {estimate_s:.0f} s")
        self.index = index
        self.tokens = tokens
        self.estimate_s = estimate_s
        self.deadline_s = deadline_s


@attrs.frozen
class Bounds:
    max_items: int = 4096  # texts waiting
    max_tokens: int = 1 << 20  # tokens waiting
    max_wait_s: float = math.inf  # the request deadline


class Admission:
    def __init__(self, queue: WorkQueue, pace: PassPace, lanes: Lanes, bounds: Bounds) -> None:
        self._queue = queue
        self._pace = pace
        self._lanes = lanes
        self.bounds = bounds

    def admit(self, lengths: Sequence[int], policy: BatchPolicy, express_open: bool) -> None:
        """All or nothing: a request is queued whole, or refused whole.

        A text that alone would run past the deadline is refused (TooSlowError) even
        on an idle server; otherwise an empty queue admits any request, so one larger
        than the bounds still runs when the server is otherwise idle.
        """
        bounds, queue = self.bounds, self._queue
        for index, length in enumerate(lengths):
            alone = self._pace.predict(1, length)
            if alone is not None and alone > bounds.max_wait_s:
                raise TooSlowError(index, length, alone, bounds.max_wait_s)
        if not queue.items:
            return
        wait = self.expected_wait_s(lengths, policy, express_open)
        if (
            queue.items + len(lengths) > bounds.max_items
            or queue.tokens + sum(lengths) > bounds.max_tokens
            or wait > bounds.max_wait_s
        ):
            raise QueueFullError(
                f"{queue.items} texts ({queue.tokens} tokens) are already "
                f"queued; this request would finish in about {wait:.0f} s",
                retry_after_s=max(1.0, wait - bounds.max_wait_s),
            )

    def expected_wait_s(
        self, lengths: Sequence[int], policy: BatchPolicy, express_open: bool
    ) -> float:
        """How long the queue plus texts of ``lengths`` take at the learnt pace; 0 if unknown.

        Texts short enough for the express lane do not wait behind the long ones;
        only the short work queued counts for them.
        """
        curve = self._pace.curve()
        if curve is None:
            return 0.0
        limit = self._lanes.express_tokens
        express = express_open and all(length <= limit for length in lengths)
        queued = self._queue.lengths(limit if express else None)
        lanes = self._lanes.workers + (1 if express else 0)
        return wait_seconds(curve, queued, lengths, policy.max_batch_tokens, lanes)


def wait_seconds(
    curve: Curve, queued: Sequence[int], lengths: Sequence[int], cap: int | None, lanes: int
) -> float:
    """How long texts of ``queued`` then ``lengths`` tokens take on ``lanes`` workers,
    packed into passes of at most ``cap`` tokens."""
    t0, t1, t2 = curve
    everything = [*queued, *lengths]
    tokens = sum(everything)
    work = sum(length * length for length in everything)
    passes = 1 + tokens // (cap or tokens or 1)
    return (passes * t0 + tokens * t1 + work * t2) / lanes


def finish_time(free: list[float], lengths: Sequence[int], curve: Curve, cap: int | None) -> float:
    """Queue texts of ``lengths`` on the earliest free workers (updating ``free``, when
    each worker is next free); when the last one ends. No workers (gate closed): never."""
    if not free:
        return math.inf
    t0, t1, t2 = curve
    per_pass = cap or math.inf
    end = -math.inf
    for length in lengths:
        lane = free.index(min(free))
        free[lane] += t0 * min(1.0, length / per_pass) + t1 * length + t2 * length * length
        end = max(end, free[lane])
    return end
