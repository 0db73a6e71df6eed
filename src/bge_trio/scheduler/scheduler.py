"""The scheduler task: packs texts from all waiting requests into memory-safe batches.

Requests send one :class:`WorkItem` per text into a bounded memory channel and
wait on their :class:`Ticket`. One scheduler task per process runs this loop:

1. wait for work;
2. take a token of the inference gate (this is where everything waits while the
   gate is closed at startup, and where batches wait for a free worker);
3. give late-comers up to ``batch_wait_s`` (measured from the oldest waiting text)
   to join, drop texts whose request was cancelled, and plan one batch with
   :func:`plan_batch`;
4. start the forward pass in a worker thread, in a child task that keeps the gate
   token until the pass ends, and loop.

Because a batch is planned only once a worker is free, everything that queued
while the previous pass ran can share the next one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import trio

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.model.encoder import Embedding, Output
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.work import Ticket, WorkItem

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[Sequence[int]], frozenset[Output]], list[Embedding]]


class BatchFailedError(RuntimeError):
    """The forward pass of a batch raised; the cause is logged, not shown to clients."""


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        gate: Gate,
        policy: BatchPolicy,
        *,
        batch_wait_s: float = 0.002,
        queue_capacity: int = 4096,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._runner = runner
        self._gate = gate
        self.policy = policy  # replaced once the memory model is known
        self._batch_wait_s = batch_wait_s
        self._send, self._receive = trio.open_memory_channel[WorkItem](queue_capacity)
        self._pending: list[WorkItem] = []  # oldest first
        self._on_batch = on_batch
        self.forwarded_items = 0  # texts that reached the model, for observability

    async def submit(
        self, token_lists: Sequence[Sequence[int]], outputs: frozenset[Output]
    ) -> list[Embedding]:
        """Queue every text of one request and wait for all results, in input order.

        If the caller is cancelled, the request's texts that have not started yet are
        dropped. A failed forward pass raises BatchFailedError.
        """
        ticket = Ticket(outputs, len(token_lists))
        try:
            now = trio.current_time()
            for index, ids in enumerate(token_lists):
                await self._send.send(WorkItem(ticket, index, ids, now))
            await ticket.done.wait()
        except BaseException:
            ticket.cancelled = True
            raise
        if ticket.error is not None:
            raise BatchFailedError("forward pass failed") from ticket.error
        return [r for r in ticket.results if r is not None]

    @property
    def queued_items(self) -> int:
        return len(self._pending) + self._receive.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop; runs until cancelled."""
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
                nursery.start_soon(self._run_batch, batch, borrower)

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return

    async def _gather_company(self) -> None:
        """Let more texts arrive until ``batch_wait_s`` after the oldest one queued."""
        self._drain()
        if not self._pending or self._batch_wait_s <= 0:
            return
        deadline = self._pending[0].enqueued_at + self._batch_wait_s
        with trio.move_on_at(deadline):
            while True:
                self._pending.append(await self._receive.receive())
                self._drain()

    def _take_batch(self) -> list[WorkItem]:
        self._drain()
        self._pending = [item for item in self._pending if not item.abandoned]
        if not self._pending:
            return []
        chosen = plan_batch([item.length for item in self._pending], self.policy)
        picked = set(chosen)
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [item for i, item in enumerate(self._pending) if i not in picked]
        return batch

    async def _run_batch(self, batch: list[WorkItem], borrower: object) -> None:
        try:
            outputs: frozenset[Output] = frozenset().union(*(i.ticket.outputs for i in batch))
            self.forwarded_items += len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), max(item.length for item in batch))
            results = await trio.to_thread.run_sync(
                self._runner, [item.token_ids for item in batch], outputs
            )
        except Exception as exc:
            log.exception("forward pass of %d texts failed", len(batch))
            for item in batch:
                item.ticket.fail(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                item.ticket.deliver(item.index, result)
        finally:
            self._gate.limiter.release_on_behalf_of(borrower)


def unlimited_policy() -> BatchPolicy:
    """A placeholder policy used before the memory model is known (the gate is closed)."""
    return BatchPolicy(CONSERVATIVE, math.inf)
