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
from bge_trio.scheduler.scheduler import Scheduler, ShuttingDownError

log = logging.getLogger("bge_trio.service")


class Draining:
    def __init__(self, scheduler: Scheduler, settled: trio.Event) -> None:
        self._scheduler = scheduler
        self._settled = settled  # set to wake requests still waiting for the model
        self.active = False
        self.requests_in_flight = 0  # embedding and score requests not yet answered

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self.requests_in_flight += 1
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.requests_in_flight -= 1
            metrics.REQUESTS_IN_FLIGHT.dec()

    def begin(self, window_s: float, nursery: trio.Nursery | None) -> None:
        """Refuse new work; keep what finishes within ``window_s``; answer the rest.

        Requests whose texts, at the learnt pace, cannot finish in the window are answered
        503 now (their clients retry elsewhere sooner); at the end of the window anything
        still waiting is answered 503 too. Idempotent: a second signal changes nothing.
        """
        if self.active:
            return
        self.active = True
        deadline = trio.current_time() + window_s
        self._settled.set()  # requests waiting for the model get their answer now
        refused = self._scheduler.close(deadline)
        log.warning(
            "shutting down: new requests are refused; of %d in flight, %d could not finish "
            "within %.1f s and were answered 503 now; the rest finish or are answered by then",
            self.requests_in_flight,
            refused,
            window_s,
        )
        if nursery is not None:
            nursery.start_soon(self._end, deadline)

    async def _end(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self._scheduler.fail_everything(ShuttingDownError("shutting down"))
