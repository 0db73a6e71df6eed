"""The inference gate: a CapacityLimiter that starts with zero tokens.

Every forward pass holds one token of the limiter, so its total is the number of
forward passes that may run at once (``BGE_TRIO_WORKERS``). At startup the total
is zero: requests can arrive, be parsed and queue, but no forward pass can start
while the model loads and the probe measures memory (a request's forward pass
would pollute the probe's peak measurements). When startup ends - successfully or
not - the gate opens by raising the total to the number of workers. Opening is
done in a ``finally`` so a failed startup can never leave requests stuck.

A request waits at the closed gate only so long (``until``): the gate owns that
deadline and lifts it when it opens, so a request whose texts are already running
is never cut off by the startup wait.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import trio


class Gate:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.limiter = trio.CapacityLimiter(1)
        self.limiter.total_tokens = 0  # closed: nothing can acquire
        self._opened = trio.Event()
        self._bounded: set[trio.CancelScope] = set()

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    def open(self) -> None:
        """Let ``workers`` forward passes run at once from now on (idempotent)."""
        if not self._opened.is_set():
            self.limiter.total_tokens = self.workers
            self._opened.set()
            for scope in self._bounded:
                scope.deadline = math.inf

    @contextlib.contextmanager
    def until(self, deadline: float) -> Iterator[trio.CancelScope]:
        """Cancel the block at ``deadline`` if the gate is still closed then.

        Check ``cancelled_caught`` on the scope afterwards: True means the gate did not
        open in time.
        """
        scope = trio.CancelScope(deadline=math.inf if self.is_open else deadline)
        self._bounded.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._bounded.discard(scope)

    async def wait_open(self) -> None:
        """Wait until the gate opens."""
        await self._opened.wait()
