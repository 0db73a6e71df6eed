"""The process's cores, shared by the forward passes of every model it serves.

A process may serve several models (an embedder and a cross-encoder), each with its own
scheduler, queue and cost model; the cores and the memory are the process's. So the
schedulers share one :class:`Cores`:

- **regular workers**: at most ``workers`` regular passes at once in the whole process,
  whichever models they belong to. When several engines wait for a worker, the one that
  has had the least time on the workers gets it (ties: the one that waited longest), so
  busy engines share the cores' time evenly whatever their passes cost: a rerank of a
  hundred documents beside 2,048-token documents embedded back to back gets about half
  the time, instead of one 1,024-token pass per 2,048-token pass. An engine back from
  idle starts from a clock that follows the least time the busy engines have had (it
  never goes back): no credit for the time it had nothing to do, and no debt for what it
  used while it had the cores to itself. Because no more passes run
  at once than with one model, every pass of every model may use the whole workspace of
  a worker (the budget is split by workers, not by models).
- **the express lane**: one short pass at a time in the whole process, beside the
  regular ones (see :mod:`.lanes`); regular passes of every engine leave it its cores,
  and its memory is one reserve set aside from every regular pass: the largest any
  engine's worst express pass needs.
- **the peak meter**: a served pass is measured only when no pass of any engine runs
  beside it (the kernel's high-water mark is per process).
- **the backlog**: admission counts the work other engines have queued and running, up
  to as much as the request's own (busy engines share the time evenly, so that is the
  most it can delay the request; see :mod:`.admission`).

With one model every rule here is what one scheduler did alone.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import trio


class Cores:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._limiter = trio.CapacityLimiter(workers)
        self._turns = itertools.count()
        self._waiting: dict[int, int] = {}  # engine -> its turn (lower: waited longer)
        self._used: dict[int, float] = {}  # engine -> seconds of regular passes it has had
        self._running: dict[int, int] = {}  # engine -> regular passes it runs now
        self._idle: set[int] = set()  # engines whose queue emptied since they last ran
        # never decreasing: the least time any busy engine has had (engines back from idle
        # start from it, as a scheduler's virtual clock)
        self._clock = 0.0
        self._wakers: dict[int, Callable[[], None]] = {}
        self._backlogs: dict[int, Callable[[], float]] = {}
        self.express_busy = False  # taken by a pass, or by one being planned
        self.express_ended = -math.inf  # time.monotonic(): read on the forward threads
        self.express_reserve_bytes: float | None = None  # None: each engine's own
        self.in_flight = 0  # passes running, of every engine
        self.started = 0  # passes started, of every engine

    def join(self, engine: int, wake: Callable[[], None], backlog: Callable[[], float]) -> None:
        """An engine's scheduler shares the cores: ``wake`` when a lane frees up,
        ``backlog``: the seconds of work it has queued and running."""
        self._wakers[engine] = wake
        self._backlogs[engine] = backlog

    # -- regular workers --------------------------------------------------------------

    def try_regular(self, engine: int, borrower: object) -> bool:
        """Take a regular worker for ``engine``'s next pass, if one is free and no other
        waiting engine has had less time on the workers (or as little, and waited longer);
        otherwise ``engine`` waits its turn."""
        if engine not in self._waiting:
            self._waiting[engine] = next(self._turns)
            if engine in self._idle or engine not in self._used:  # back from idle
                self._idle.discard(engine)
                self._used[engine] = max(self._used.get(engine, 0.0), self._clock)
        if self._limiter.available_tokens < 1:
            return False
        mine = self._place(engine)
        if any(self._place(other) < mine for other in self._waiting if other != engine):
            return False
        self._limiter.acquire_on_behalf_of_nowait(borrower)
        del self._waiting[engine]
        self._running[engine] = self._running.get(engine, 0) + 1
        return True

    def _place(self, engine: int) -> tuple[float, int]:
        return self._used.get(engine, 0.0), self._waiting[engine]

    def _busy(self) -> set[int]:
        return set(self._waiting) | {engine for engine, n in self._running.items() if n}

    def stop_waiting(self, engine: int) -> None:
        """``engine`` has nothing to run (any more): it gives up its turn."""
        self._idle.add(engine)
        if self._waiting.pop(engine, None) is not None:
            self._wake_all()

    def release_regular(self, engine: int, borrower: object, seconds: float) -> None:
        """``engine``'s pass that took ``borrower``'s worker ran ``seconds`` (0 if none ran)."""
        self._limiter.release_on_behalf_of(borrower)
        self._used[engine] = self._used.get(engine, 0.0) + seconds
        self._clock = max(self._clock, min(self._used.get(e, 0.0) for e in self._busy()))
        self._running[engine] -= 1
        self._wake_all()

    # -- the express lane -------------------------------------------------------------

    def reserve_express(self) -> None:
        """Take the express lane for a pass about to be planned."""
        self.express_busy = True

    def release_express(self) -> None:
        """The express lane is free again; regular passes keep sharing the cores a while."""
        self.express_busy = False
        self.express_ended = time.monotonic()
        self._wake_all()

    # -- admission --------------------------------------------------------------------

    def others_backlog_s(self, engine: int) -> float:
        """Seconds of work every other engine has queued and running."""
        return sum(backlog() for who, backlog in self._backlogs.items() if who != engine)

    def _wake_all(self) -> None:
        for wake in self._wakers.values():
            wake()
