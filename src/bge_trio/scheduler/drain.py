"""Draining at shutdown: keep the work that can finish by the deadline, answer the rest.

At the learnt pace, queued texts are laid out in order on the regular workers after
the passes already running; a request whose texts end after the deadline is
answered :func:`~bge_trio.errors.shutting_down` at once (its client retries elsewhere
sooner), and so is one arriving later that could not finish in time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from bge_trio.errors import shutting_down
from bge_trio.scheduler.admission import Curve, finish_time
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.passes import Passes
from bge_trio.scheduler.queue import WorkQueue
from bge_trio.scheduler.work import Ticket


class Drain:
    def __init__(self, queue: WorkQueue, passes: Passes, gate: Gate, pace: PassPace) -> None:
        # all four belong to the scheduler that made this drain; it only reads them
        self._queue = queue
        self._passes = passes
        self._gate = gate
        self._pace = pace
        self.deadline: float | None = None  # set once the process is stopping

    def refuses(self, lengths: Sequence[int], cap: int | None) -> bool:
        """Whether texts of ``lengths``, queued now, would end after the deadline."""
        if self.deadline is None:
            return False
        _, free, curve = self.schedule(cap)
        return finish_time(free, lengths, curve, cap) > self.deadline

    def close(self, deadline: float, cap: int | None) -> int:
        """From now on, keep only the work that can finish by ``deadline``.

        Returns how many requests were answered ShuttingDown now. Requests still on
        their way (being tokenised) are judged by :meth:`refuses` when they submit.
        Before the pace is known (startup) nothing queued can be promised. A pass whose
        requests are all answered stops at its next layer.
        """
        self.deadline = deadline
        finishes, _, _ = self.schedule(cap)
        doomed = {
            id(ticket): ticket
            for ticket, finish in finishes
            if not ticket.finished and finish > deadline
        }
        for ticket in doomed.values():
            ticket.fail(shutting_down())
        return len(doomed)

    def fail_everything(self, error: BaseException) -> None:
        """Answer every request still waiting, queued or in a pass, with ``error``."""
        for running in self._passes.running.values():
            for item in running.batch:
                item.ticket.fail(error)
        self._queue.fail_all(error)

    def schedule(self, cap: int | None) -> tuple[list[tuple[Ticket, float]], list[float], Curve]:
        """When each waiting text's pass should end, oldest first; when each regular
        worker is free after all of them; and the pace curve used.

        Texts waiting at the closed gate (startup) have no end in sight (inf). Where
        the pace is not yet known, a pass is assumed to end now: kept, and answered
        at the drain's deadline if it has not finished by then.
        """
        now = trio.current_time()
        curve = self._pace.curve() or (0.0, 0.0, 0.0)
        pending = self._queue.pending
        if not self._gate.is_open:
            return [(item.ticket, math.inf) for item in pending], [], curve
        finishes: list[tuple[Ticket, float]] = []
        free = [now] * self._gate.workers
        for running in self._passes.running.values():
            end = now if running.predicted is None else running.started + running.predicted
            if not running.on_express:
                free[free.index(min(free))] = max(end, now)
            finishes.extend((item.ticket, end) for item in running.batch)
        for item in pending:
            finishes.append((item.ticket, finish_time(free, [item.length], curve, cap)))
        return finishes, free, curve
