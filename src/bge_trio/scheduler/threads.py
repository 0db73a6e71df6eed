"""Forward passes on pinned threads.

torch runs a forward pass's matrix work on an OpenMP thread team owned by the
calling thread. ``trio.to_thread.run_sync`` may hand each call to a different
worker thread, and every new caller pays for a cold team and cold caches:
measured on all-MiniLM-L6-v2 with a one-query batch, 10.3 ms per pass from one
fixed thread against 12.6 ms when four threads take turns and 14.2 ms from a new
thread each time. So each concurrent forward pass gets its own long-lived thread
and keeps it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import trio

from bge_trio.scheduler.lanes import Lanes

T = TypeVar("T")


class PinnedThread:
    """One OS thread that runs, one after another, every call handed to it."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this thread and wait for it.

        Like ``trio.to_thread.run_sync``, a call that has started is not abandoned:
        cancellation waits for it to finish (the thread cannot be interrupted anyway).
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed back to the caller
                outcome["error"] = exc
            with contextlib.suppress(trio.RunFinishedError):  # the loop is gone
                token.run_sync_soon(done.set)

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def close(self) -> None:
        self._jobs.put(None)


class ForwardThreads:
    """The pinned threads forward passes run on: one per regular worker, one for the
    express lane where it exists. The engine owns and opens them, runs loading and the
    probe on the first, and hands them to its scheduler.
    """

    def __init__(self, lanes: Lanes) -> None:
        self.lanes = lanes
        self.regular: list[PinnedThread] = []  # while open
        self.express: PinnedThread | None = None

    @contextlib.asynccontextmanager
    async def opened(self, set_threads: Callable[[int], None]) -> AsyncIterator[None]:
        """Start the threads, each with its torch thread count, and stop them after.

        Whoever opens them first owns them (the engine, for its whole life: loading and
        the probe run on them too); opening them again while open changes nothing."""
        if self.regular:
            yield
            return
        lanes = self.lanes
        regular = [PinnedThread(f"bge-trio-forward-{i}") for i in range(lanes.workers)]
        express = PinnedThread("bge-trio-express") if lanes.express else None
        try:
            for thread in regular:
                await thread.run(set_threads, lanes.threads)
            if express is not None:
                await express.run(set_threads, lanes.express_threads)
            self.regular, self.express = regular, express
            yield
        finally:
            self.regular, self.express = [], None
            for thread in [*regular, *([express] if express else [])]:
                thread.close()

    async def run_each(self, fn: Callable[..., T], *args: Any) -> list[T]:
        """Run ``fn(*args)`` on every regular worker's thread at once; the results in
        thread order (for timing passes as they run under load: side by side)."""
        results: list[T] = []

        async def one(thread: PinnedThread) -> None:
            results.append(await thread.run(fn, *args))

        async with trio.open_nursery() as nursery:
            for thread in self.regular:
                nursery.start_soon(one, thread)
        return results

    async def run_first(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other torch work (loading, the probe) on the first forward thread.

        libgomp gives every thread that starts parallel work its own OpenMP team, and
        once more team threads exist than cores, it stops spinning between parallel
        regions: each op then pays to wake its team. Measured on all-MiniLM-L6-v2,
        a one-query pass took 7.7 ms from the only team and 9.7 ms once a second
        team existed. Keeping all torch work on the forward threads keeps one team
        per worker. Falls back to a trio worker thread when they are not open.
        """
        if self.regular:
            return await self.regular[0].run(fn, *args)
        return await trio.to_thread.run_sync(fn, *args)
