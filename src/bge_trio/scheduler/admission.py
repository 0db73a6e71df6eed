"""Admission: whether a request's texts may join the queue, judged by time.

Time comes from the learnt pace ``(t0, t1, t2)``: a pass of padded length S over
n tokens takes about ``t0 + t1·n + t2·n·S`` seconds (see :mod:`.pace`). A request
that would wait longer than its deadline is better refused now (429, retry
elsewhere) than accepted and timed out later (504, work wasted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs

from bge_trio.errors import Overloaded, TooSlow
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.lanes import Lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.queue import WorkQueue

Curve = tuple[float, float, float]
# A request is queued only if it is predicted to end within this share of its deadline:
# the pace is an estimate, and a request admitted on an estimate that proves short is a
# 504 after the whole deadline. The pace is learnt from passes timed before any request
# came (seeded at startup) or from recent ones; under a burst, parsing requests and
# encoding answers take cores from the passes, and all-MiniLM-L6-v2 served a burst on two
# cores up to 15 % slower than the seeded pace promised (admitted at 0.9 of a 10 s
# deadline, answered past it). A quarter of the deadline covers that with room to spare.
ADMIT_SHARE = 0.75


@attrs.frozen
class Bounds:
    max_items: int = 4096  # texts waiting
    max_tokens: int = 1 << 20  # tokens waiting
    max_wait_s: float = math.inf  # the request deadline


class Admission:
    def __init__(
        self,
        queue: WorkQueue,
        pace: PassPace,
        lanes: Lanes,
        bounds: Bounds,
        running_s: Callable[[], float] = lambda: 0.0,
        others_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._queue = queue
        self._pace = pace
        self._lanes = lanes
        self.bounds = bounds
        self._running_s = running_s  # seconds left in the regular passes running now
        # seconds of work the other models of the process have queued and running
        self._others_s = others_s

    def admit(self, lengths: Sequence[int], policy: BatchPolicy, express_open: bool) -> None:
        """All or nothing: a request is queued whole, or refused whole.

        A text that alone would run past the deadline, or a request whose texts alone
        would, is refused (:class:`~bge_trio.errors.TooSlow`) even on an idle server:
        waiting would only end in a timeout. Otherwise an idle server (nothing queued or
        running) admits any request, so one larger than the queue's bounds still runs.
        """
        bounds, queue = self.bounds, self._queue
        deadline = bounds.max_wait_s
        for index, length in enumerate(lengths):
            alone = self._pace.predict(1, length)
            if alone is not None and alone > deadline:
                raise TooSlow(
                    f"input[{index}] has {length} tokens; at this server's measured pace it "
                    f"would take about {alone:.0f} s, more than the request deadline of "
                    f"{deadline:g} s. Send a shorter text (or its parts in separate requests), "
                    "or raise BGE_TRIO_REQUEST_TIMEOUT_S",
                    index=index,
                    tokens=length,
                    estimate_s=alone,
                    deadline_s=deadline,
                )
        curve = self._pace.curve()
        if curve is not None:
            lanes = self._lanes.workers
            alone = wait_seconds(curve, [], lengths, policy.max_batch_tokens, lanes)
            if alone > deadline:
                raise TooSlow(
                    f"this request's {len(lengths)} texts ({sum(lengths)} tokens) would take "
                    f"about {alone:.0f} s at this server's measured pace even on an idle "
                    f"server, more than the request deadline of {deadline:g} s. Send them in "
                    "several smaller requests, or raise BGE_TRIO_REQUEST_TIMEOUT_S",
                    index=None,
                    tokens=sum(lengths),
                    estimate_s=alone,
                    deadline_s=deadline,
                )
        if not queue.items and self._running_s() <= 0 and self._others_s() <= 0:
            return
        wait = self.expected_wait_s(lengths, policy, express_open)
        if (
            queue.items + len(lengths) > bounds.max_items
            or queue.tokens + sum(lengths) > bounds.max_tokens
            or wait > ADMIT_SHARE * deadline
        ):
            raise Overloaded(
                f"the server is at capacity ({queue.items} texts ({queue.tokens} tokens) are "
                f"already queued; this request would finish in about {wait:.0f} s); retry "
                "after a short wait",
                retry_after_s=max(1.0, wait - ADMIT_SHARE * deadline),
                code="queue_full",
            )

    def queued_s(self, policy: BatchPolicy) -> float:
        """Seconds the texts queued now take on one worker at the learnt pace; 0 if unknown."""
        curve = self._pace.curve()
        if curve is None or not self._queue.items:
            return 0.0
        return wait_seconds(curve, self._queue.lengths(None), [], policy.max_batch_tokens, 1)

    def expected_wait_s(
        self, lengths: Sequence[int], policy: BatchPolicy, express_open: bool
    ) -> float:
        """How long the queue plus texts of ``lengths`` take at the learnt pace; 0 if unknown.

        The regular passes running now count with the time they have left. Texts short
        enough for the express lane do not wait behind the long ones; only the short
        work queued counts for them. In a process that serves several models, busy
        engines share the workers' time evenly (:mod:`.cores`), so the other models' work
        delays these texts by at most as long as their own work takes: the lesser of the
        two counts.
        """
        curve = self._pace.curve()
        if curve is None:
            return 0.0
        limit = self._lanes.express_tokens
        express = express_open and all(length <= limit for length in lengths)
        queued = self._queue.lengths(limit if express else None)
        cap = policy.max_batch_tokens
        if express:  # the express lane besides the workers; long passes do not hold it
            return wait_seconds(curve, queued, lengths, cap, self._lanes.workers + 1)
        lanes = self._lanes.workers
        # The work shared out evenly over the workers, and on several workers part of
        # a pass more: work in passes ends at most (1 - 1/workers) of its largest pass
        # after its even share (the request's last texts may share the last pass).
        running = self._running_s() / lanes
        texts = len(queued) + len(lengths)
        last_pass = largest_pass_s(curve, policy, max(lengths, default=0), texts)
        even = wait_seconds(curve, queued, lengths, cap, lanes)
        others = min(self._others_s() / lanes, even)
        return running + even + others + (1 - 1 / lanes) * last_pass


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


def largest_pass_s(curve: Curve, policy: BatchPolicy, seq: int, texts: int) -> float:
    """How long the largest pass of at most ``texts`` texts of ``seq`` tokens the policy
    allows takes."""
    if seq <= 0 or texts <= 0:
        return 0.0
    low, high = 1, min(texts, policy.max_batch_items)  # the largest batch that fits: low
    while low < high:
        middle = (low + high + 1) // 2
        if policy.fits(middle, seq):
            low = middle
        else:
            high = middle - 1
    t0, t1, t2 = curve
    return t0 + low * seq * (t1 + t2 * seq)


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
