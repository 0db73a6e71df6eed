"""The scheduler task: packs texts from all waiting requests into memory-safe batches.

Requests send one :class:`WorkItem` per text into a bounded memory channel and
wait on their :class:`Ticket`. One scheduler task per process runs this loop:

1. wait for work;
2. take a token of the inference gate (this is where everything waits while the
   gate is closed at startup, and where batches wait for a free worker);
3. while other requests are still being tokenised, give them up to ``batch_wait_s``
   (measured from the oldest waiting text) to join; drop texts whose request was
   cancelled; plan one batch with :func:`plan_batch`, weighing padding against the
   cost of a pass as measured by :class:`PassPace`;
4. start the forward pass in a worker thread, in a child task that keeps the gate
   token until the pass ends, and loop.

Because a batch is planned only once a worker is free, everything that queued
while the previous pass ran can share the next one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import trio

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import Embedding, Output
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.threads import PinnedThread
from bge_trio.scheduler.work import Ticket, WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")

Runner = Callable[[Sequence[Sequence[int]], frozenset[Output]], list[Embedding]]
# (batch, padded length, measured peak bytes) of a pass that ran alone
PeakListener = Callable[[int, int, int], None]


class Observer(Protocol):
    """Receives what the scheduler does, for metrics."""

    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None: ...

    def batch_finished(self, seconds: float, ok: bool) -> None: ...

    def queue_changed(self, items: int, tokens: int) -> None: ...


class _Unobserved:
    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None:
        pass

    def batch_finished(self, seconds: float, ok: bool) -> None:
        pass

    def queue_changed(self, items: int, tokens: int) -> None:
        pass


@attrs.define
class Timing:
    """Where a request's time went: waiting for a batch, and in forward passes."""

    queue_s: float = 0.0
    inference_s: float = 0.0


class BatchFailedError(RuntimeError):
    """The forward pass of a batch raised; the cause is logged, not shown to clients."""


class QueueFullError(RuntimeError):
    """Admitting the request would take the queue past its bound (a 429 for the client)."""


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        gate: Gate,
        policy: BatchPolicy,
        *,
        batch_wait_s: float = 0.002,
        max_queue_items: int = 4096,
        max_queue_tokens: int = 1 << 20,
        max_wait_s: float = math.inf,
        observer: Observer | None = None,
        meter: PeakMeter | None = None,
        on_peak: PeakListener | None = None,
    ) -> None:
        self._runner = runner
        self._gate = gate
        self.policy = policy  # replaced once the memory model is known
        self._batch_wait_s = batch_wait_s
        self.max_queue_items = max_queue_items
        self.max_queue_tokens = max_queue_tokens
        self.max_wait_s = max_wait_s
        self.tokens_per_s: float | None = None  # per forward pass, smoothed
        self.pace = PassPace()
        # Admission control bounds what is queued, so the channel itself never has to
        # push back; its capacity only needs to exceed the largest admissible queue.
        self._send, self._receive = trio.open_memory_channel[WorkItem](max_queue_items + 100_000)
        self._pending: list[WorkItem] = []  # oldest first
        self._observer: Observer = observer or _Unobserved()
        self.queued_items = 0  # admitted texts not yet in a forward pass (or dropped)
        self.queued_tokens = 0
        self.forwarded_items = 0  # texts that reached the model, for observability
        self.consecutive_failures = 0
        self._threads: list[PinnedThread] = []  # while run() runs
        self._arriving = 0  # requests being tokenised, about to submit
        # Per-pass peaks: the kernel's high-water mark is per process, so only a pass
        # that started and ended with no other pass in flight is measured.
        self._meter = meter
        self._on_peak = on_peak
        self._in_flight = 0
        self._passes_started = 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being tokenised) while the block runs.

        A batch waits for company only while some request is on its way: with
        nobody coming, waiting would only add ``batch_wait_s`` to every request.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def on_forward_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other torch work (loading, the probe) on the first forward thread.

        libgomp gives every thread that starts parallel work its own OpenMP team, and
        once more team threads exist than cores, it stops spinning between parallel
        regions: each op then pays to wake its team. Measured on all-MiniLM-L6-v2,
        a one-query pass took 7.7 ms from the only team and 9.7 ms once a second
        team existed. Keeping all torch work on the forward threads keeps one team
        per worker. Falls back to a trio worker thread when the scheduler is not
        running.
        """
        if self._threads:
            return await self._threads[0].run(fn, *args)
        return await trio.to_thread.run_sync(fn, *args)

    async def submit(
        self,
        token_lists: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        timing: Timing | None = None,
    ) -> list[Embedding]:
        """Queue every text of one request and wait for all results, in input order.

        If the caller is cancelled, the request's texts that have not started yet are
        dropped. A failed forward pass raises BatchFailedError.
        """
        self._admit(token_lists)
        ticket = Ticket(outputs, len(token_lists))
        sent = 0
        try:
            now = trio.current_time()
            for index, ids in enumerate(token_lists):
                item = WorkItem(ticket, index, ids, now)
                # No checkpoint between a request's texts: the scheduler must see them all
                # at once, or it plans a pass from the first few and the rest wait for the next.
                try:
                    self._send.send_nowait(item)
                except trio.WouldBlock:
                    await self._send.send(item)
                sent += 1
            await ticket.done.wait()
        except BaseException:
            ticket.cancelled = True
            unsent = token_lists[sent:]  # admitted but never queued
            self.queued_items -= len(unsent)
            self.queued_tokens -= sum(len(ids) for ids in unsent)
            self._observer.queue_changed(self.queued_items, self.queued_tokens)
            raise
        if ticket.error is not None:
            raise BatchFailedError("forward pass failed") from ticket.error
        if timing is not None:
            timing.queue_s, timing.inference_s = ticket.queue_s, ticket.inference_s
        return [r for r in ticket.results if r is not None]

    def _admit(self, token_lists: Sequence[Sequence[int]]) -> None:
        """All or nothing: a request is queued whole, or refused whole.

        An empty queue admits any request, so one larger than the bounds still runs
        when the server is otherwise idle.
        """
        items = len(token_lists)
        tokens = sum(len(ids) for ids in token_lists)
        if self.queued_items and (
            self.queued_items + items > self.max_queue_items
            or self.queued_tokens + tokens > self.max_queue_tokens
            or self.expected_wait_s(tokens) > self.max_wait_s
        ):
            raise QueueFullError(
                f"{self.queued_items} texts ({self.queued_tokens} tokens) are already queued"
            )
        self.queued_items += items
        self.queued_tokens += tokens
        self._observer.queue_changed(self.queued_items, self.queued_tokens)

    def expected_wait_s(self, extra_tokens: int = 0) -> float:
        """How long the queue (plus ``extra_tokens``) takes at the measured speed; 0 if unknown.

        A request that would wait longer than its deadline is better refused now (429,
        retry elsewhere) than accepted and timed out later (504, work wasted).
        """
        if not self.tokens_per_s:
            return 0.0
        rate = self.tokens_per_s * self._gate.workers
        return (self.queued_tokens + extra_tokens) / rate

    def _dequeue(self, items: Sequence[WorkItem]) -> None:
        self.queued_items -= len(items)
        self.queued_tokens -= sum(item.length for item in items)
        self._observer.queue_changed(self.queued_items, self.queued_tokens)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop; runs until cancelled."""
        # One pinned thread per gate token: holding a token means a thread is free.
        idle = [PinnedThread(f"bge-trio-forward-{i}") for i in range(self._gate.workers)]
        threads = list(idle)
        self._threads = threads
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    if not self._pending:
                        self._pending.append(await self._receive.receive())
                    borrower = object()
                    await self._gate.limiter.acquire_on_behalf_of(borrower)
                    try:
                        await self._gather_company()
                        batch = self._take_batch()
                    except BaseException:
                        self._gate.limiter.release_on_behalf_of(borrower)
                        raise
                    if not batch:
                        self._gate.limiter.release_on_behalf_of(borrower)
                        continue
                    nursery.start_soon(self._run_batch, batch, borrower, idle)
        finally:
            self._threads = []
            for thread in threads:
                thread.close()

    def fail_all(self, error: BaseException) -> None:
        """Answer every queued text with ``error`` (used when the scheduler cannot go on)."""
        self._drain()
        for item in self._pending:
            item.ticket.fail(error)
        self._dequeue(self._pending)
        self._pending = []

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return

    async def _gather_company(self) -> None:
        """While requests are on their way, let them join, up to ``batch_wait_s``
        after the oldest text queued."""
        self._drain()
        if not self._pending or self._batch_wait_s <= 0:
            return
        deadline = self._pending[0].enqueued_at + self._batch_wait_s
        with trio.move_on_at(deadline):
            while self._arriving:
                self._pending.append(await self._receive.receive())
                self._drain()

    def _take_batch(self) -> list[WorkItem]:
        self._drain()
        dropped = [item for item in self._pending if item.abandoned]
        if dropped:
            self._dequeue(dropped)
            self._pending = [item for item in self._pending if not item.abandoned]
        if not self._pending:
            return []
        chosen = plan_batch(
            [item.length for item in self._pending], self.policy, self.pace.overhead_tokens
        )
        picked = set(chosen)
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [item for i, item in enumerate(self._pending) if i not in picked]
        self._dequeue(batch)
        return batch

    async def _run_batch(
        self, batch: list[WorkItem], borrower: object, idle: list[PinnedThread]
    ) -> None:
        thread = idle.pop()
        started = trio.current_time()
        padded = len(batch) * max(item.length for item in batch)
        try:
            outputs: frozenset[Output] = frozenset().union(*(i.ticket.outputs for i in batch))
            self.forwarded_items += len(batch)
            self._observer.batch_started(
                len(batch), padded, [started - item.enqueued_at for item in batch]
            )
            results = await self._forward(thread, batch, outputs)
        except Exception as exc:
            self._observer.batch_finished(trio.current_time() - started, ok=False)
            self.consecutive_failures += 1
            log.exception("forward pass of %d texts failed", len(batch))
            for item in batch:
                item.ticket.fail(exc)
        else:
            elapsed = trio.current_time() - started
            self._observer.batch_finished(elapsed, ok=True)
            self.pace.observe(padded, elapsed)
            for ticket in {id(item.ticket): item.ticket for item in batch}.values():
                ticket.inference_s += elapsed
            for item in batch:
                item.ticket.queue_s = max(item.ticket.queue_s, started - item.enqueued_at)
            self.consecutive_failures = 0
            if elapsed > 0:
                rate = sum(item.length for item in batch) / elapsed
                previous = self.tokens_per_s
                self.tokens_per_s = rate if previous is None else 0.8 * previous + 0.2 * rate
            for item, result in zip(batch, results, strict=True):
                item.ticket.deliver(item.index, result)
        finally:
            idle.append(thread)
            self._gate.limiter.release_on_behalf_of(borrower)

    async def _forward(
        self, thread: PinnedThread, batch: list[WorkItem], outputs: frozenset[Output]
    ) -> list[Embedding]:
        """Run the pass, measuring its peak when it runs alone."""
        ids = [item.token_ids for item in batch]
        alone = self._in_flight == 0
        self._in_flight += 1
        self._passes_started += 1
        generation = self._passes_started
        try:
            if not (alone and self._meter is not None and self._on_peak is not None):
                plain: list[Embedding] = await thread.run(self._runner, ids, outputs)
                return plain
            results: list[Embedding]
            peak: int
            results, peak = await thread.run(
                self._meter.measure_pass, partial(self._runner, ids, outputs)
            )
        finally:
            self._in_flight -= 1
        if generation == self._passes_started:  # no other pass started meanwhile
            self._on_peak(len(batch), max(item.length for item in batch), peak)
        return results


def unlimited_policy() -> BatchPolicy:
    """A placeholder policy used before the memory model is known (the gate is closed)."""
    return BatchPolicy(CONSERVATIVE, math.inf)
