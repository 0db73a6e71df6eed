"""Requests in flight, and draining them when the process is told to stop.

Draining refuses new work with 503, lets accepted work that can finish within the
window finish, and answers the rest 503 at once, so every request has its answer
before the server closes its connections.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio

from bge_trio import metrics
from bge_trio.errors import shutting_down
from bge_trio.scheduler.scheduler import Scheduler

log = logging.getLogger("bge_trio.engine")


class Draining:
    def __init__(self, model: str) -> None:
        self._model = model
        self.active = False
        self.requests_in_flight = 0  # embedding and score requests not yet answered

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self.requests_in_flight += 1
        metrics.REQUESTS_IN_FLIGHT.labels(self._model).inc()
        try:
            yield
        finally:
            self.requests_in_flight -= 1
            metrics.REQUESTS_IN_FLIGHT.labels(self._model).dec()

    def begin(self, window_s: float, scheduler: Scheduler | None, nursery: trio.Nursery) -> None:
        """Refuse new work; keep what finishes within ``window_s``; answer the rest.

        Requests whose texts, at the learnt pace, cannot finish in the window are answered
        503 now (their clients retry elsewhere sooner); at the end of the window anything
        still waiting is answered 503 too. Idempotent: a second signal changes nothing.
        """
        if self.active:
            return
        self.active = True
        deadline = trio.current_time() + window_s
        refused = 0 if scheduler is None else scheduler.close(deadline)
        log.warning(
            "shutting down: new requests are refused; of %d in flight, %d could not finish "
            "within %.1f s and were answered 503 now; the rest finish or are answered by then",
            self.requests_in_flight,
            refused,
            window_s,
        )
        if scheduler is not None:
            nursery.start_soon(_end, scheduler, deadline)


async def _end(scheduler: Scheduler, deadline: float) -> None:
    await trio.sleep_until(deadline)
    scheduler.fail_everything(shutting_down())
