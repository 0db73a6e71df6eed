"""The scheduler task: packs texts from all waiting requests into memory-safe batches.

Requests queue one :class:`WorkItem` per text and wait on their :class:`Ticket`.
One scheduler task per process runs this loop:

1. wait for work;
2. wait for a lane: a token of the inference gate (a regular worker; this is where
   everything waits while the gate is closed at startup), or, while every regular
   worker is busy, the express lane for short texts (see :mod:`.lanes`);
3. while other requests are still being tokenised, give them up to ``batch_wait_s``
   (measured from the oldest waiting text) to join; drop texts whose request was
   cancelled; plan one batch with :func:`plan_batch`, weighing padding against the
   cost of a pass as measured by :class:`PassPace`;
4. start the forward pass on the lane's thread, in a child task that keeps the lane
   until the pass ends, and loop.

Because a batch is planned only once a lane is free, everything that queued while
the previous pass ran can share the next one. Between encoder layers a pass checks
whether anyone still waits for it (a pass whose requests all timed out or went away
stops there) and how many threads it may use.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import attrs
import trio

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import Embedding, Output, set_threads
from bge_trio.scheduler.admission import Admission, Bounds, Curve, QueueFullError, TooSlowError
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.drain import Drain, ShuttingDownError
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.lanes import Lanes, express_share, plan_lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.passes import Passes, PeakListener, Runner
from bge_trio.scheduler.queue import WorkQueue
from bge_trio.scheduler.threads import ForwardThreads, PinnedThread
from bge_trio.scheduler.work import Ticket, WorkItem

__all__ = [
    "BatchFailedError",
    "PeakListener",
    "QueueFullError",
    "Runner",
    "Scheduler",
    "ShuttingDownError",
    "TooSlowError",
]


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


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        gate: Gate,
        policy: BatchPolicy,
        *,
        lanes: Lanes | None = None,
        forward_threads: ForwardThreads | None = None,
        batch_wait_s: float = 0.002,
        max_queue_items: int = 4096,
        max_queue_tokens: int = 1 << 20,
        max_wait_s: float = math.inf,
        observer: Observer | None = None,
        meter: PeakMeter | None = None,
        on_peak: PeakListener | None = None,
        threads: Callable[[int], None] = set_threads,
    ) -> None:
        self._gate = gate
        self.lanes = lanes or plan_lanes(gate.workers, gate.workers, express_tokens=0)
        self._forward_threads = forward_threads or ForwardThreads(self.lanes)
        self._set_threads = threads
        self._policy = policy
        self._given_policy = policy  # before the express lane's share is set aside
        self._express_policy: BatchPolicy | None = None
        self.set_policy(policy)
        self._batch_wait_s = batch_wait_s
        self._pace = pace = PassPace()
        observer = observer or _Unobserved()
        self._queue = queue = WorkQueue(observer)
        self._passes = passes = Passes(
            runner, self.lanes, pace, observer, meter=meter, on_peak=on_peak, set_threads=threads
        )
        bounds = Bounds(max_queue_items, max_queue_tokens, max_wait_s)
        self._admission = Admission(queue, pace, self.lanes, bounds, passes.seconds_left)
        self._drain = Drain(queue, passes, gate, pace)
        self._wake = trio.Event()  # set when work arrives or a lane frees up
        self._arriving = 0  # requests being tokenised, about to submit

    # -- policies, pace, statistics ---------------------------------------------------

    @property
    def policy(self) -> BatchPolicy:
        """The limits of regular passes (the given policy less the express lane's share)."""
        return self._policy

    @property
    def express_policy(self) -> BatchPolicy | None:
        """The limits of express passes; None while the express lane is shut."""
        return self._express_policy

    @property
    def given_policy(self) -> BatchPolicy:
        """The policy last given to :meth:`set_policy`."""
        return self._given_policy

    def set_policy(self, policy: BatchPolicy) -> None:
        """The limits of regular passes, and of express passes beside them (see
        :func:`~bge_trio.scheduler.lanes.express_share`)."""
        self._given_policy = policy
        self._policy, self._express_policy = express_share(policy, self.lanes.express_tokens)

    def seed_pace(self, passes: Iterable[tuple[int, int, float]]) -> None:
        """Start the pace from (batch, seq, seconds) passes timed elsewhere (the probe)."""
        self._pace.seed(passes)

    def predict_seconds(self, batch: int, seq: int) -> float | None:
        """How long a pass of ``batch`` texts padded to ``seq`` takes (None: unknown yet)."""
        return self._pace.predict(batch, seq)

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of what the scheduler holds and has done."""
        passes = self._passes
        return SchedulerStatistics(
            queued_items=self._queue.items,
            queued_tokens=self._queue.tokens,
            forwarded_items=passes.forwarded_items,
            passes_stopped_early=passes.stopped_early,
            express_passes=passes.express_passes,
            express_open=self._express_policy is not None,
            consecutive_failures=passes.consecutive_failures,
            passes_observed=self._pace.passes,
            pace_curve=self._pace.curve(),
            pace_overhead_tokens=self._pace.overhead_tokens,
        )

    # -- requests ---------------------------------------------------------------------

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
            self._wake.set()

    async def submit(
        self,
        token_lists: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        timing: Timing | None = None,
    ) -> list[Embedding]:
        """Queue every text of one request and wait for all results, in input order.

        If the caller is cancelled, the request's texts that have not started yet are
        dropped, and a pass whose texts are all dropped stops at its next layer. A
        failed forward pass raises BatchFailedError. Once the process is stopping, a
        request that cannot finish by the drain's deadline raises ShuttingDownError.
        """
        lengths = [len(ids) for ids in token_lists]
        if self._drain.refuses(lengths, self._policy.max_batch_tokens):
            raise ShuttingDownError("shutting down")
        self._admission.admit(lengths, self._policy, self._express_policy is not None)
        ticket = Ticket(outputs, len(token_lists))
        now = trio.current_time()
        # All at once, no checkpoint: the scheduler must see a request's texts together,
        # or it plans a pass from the first few and the rest wait for the next.
        self._queue.add([WorkItem(ticket, i, ids, now) for i, ids in enumerate(token_lists)])
        self._wake.set()
        try:
            await ticket.done.wait()
        except BaseException:
            ticket.cancelled = True
            self._wake.set()
            raise
        if isinstance(ticket.error, ShuttingDownError):
            raise ShuttingDownError("shutting down")
        if ticket.error is not None:
            raise BatchFailedError("forward pass failed") from ticket.error
        if timing is not None:
            timing.queue_s, timing.inference_s = ticket.queue_s, ticket.inference_s
        return [r for r in ticket.results if r is not None]

    def expected_wait_s(self, lengths: Sequence[int] = ()) -> float:
        """How long the queue plus texts of ``lengths`` take at the learnt pace; 0 if unknown."""
        express_open = self._express_policy is not None
        return self._admission.expected_wait_s(lengths, self._policy, express_open)

    # -- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop; runs until cancelled."""
        threads = self._forward_threads
        async with threads.opened(self._set_threads), trio.open_nursery() as nursery:
            # One pinned thread per gate token: holding a token means a thread is free.
            idle = list(threads.regular)
            task_status.started()
            while True:
                while not self._queue:
                    await self._changed()
                borrower = object()
                await self._gate.wait_open()
                on_express = await self._free_lane(borrower)
                try:
                    await self._gather_company()
                    batch = self._take_batch(on_express)
                except BaseException:
                    self._release(on_express, borrower)
                    raise
                if not batch:
                    self._release(on_express, borrower)
                    continue
                if on_express:
                    assert threads.express is not None
                    self._passes.express_busy = True
                    lane = [threads.express]
                    nursery.start_soon(self._run_batch, batch, borrower, lane, True)
                else:
                    nursery.start_soon(self._run_batch, batch, borrower, idle, False)

    async def _changed(self) -> None:
        """Wait until work arrives, a request goes, or a lane frees up."""
        await self._wake.wait()
        self._wake = trio.Event()

    async def _free_lane(self, borrower: object) -> bool:
        """Wait for a regular worker (False) or, for short work, the express lane (True)."""
        while True:
            try:
                self._gate.limiter.acquire_on_behalf_of_nowait(borrower)
                return False
            except trio.WouldBlock:
                pass
            if self._express_work():
                self._passes.express_busy = True
                return True
            await self._changed()

    def _express_work(self) -> bool:
        if self._express_policy is None or self._passes.express_busy:
            return False
        limit = self.lanes.express_tokens
        return any(item.length <= limit and not item.abandoned for item in self._queue.pending)

    def _release(self, on_express: bool, borrower: object) -> None:
        if on_express:
            self._passes.express_busy = False
            self._passes.express_ended = time.monotonic()
        else:
            self._gate.limiter.release_on_behalf_of(borrower)
        self._wake.set()

    async def _gather_company(self) -> None:
        """While requests are on their way, let them join, up to ``batch_wait_s``
        after the oldest text queued."""
        if not self._queue or self._batch_wait_s <= 0:
            return
        deadline = self._queue.pending[0].enqueued_at + self._batch_wait_s
        with trio.move_on_at(deadline):
            while self._arriving:
                await self._changed()

    def _take_batch(self, on_express: bool) -> list[WorkItem]:
        self._queue.drop_abandoned()
        pending = self._queue.pending
        if on_express:
            assert self._express_policy is not None
            policy = self._express_policy
            limit = self.lanes.express_tokens
            candidates = [i for i, item in enumerate(pending) if item.length <= limit]
        else:
            policy = self._policy
            candidates = list(range(len(pending)))
        if not candidates:
            return []
        lengths = [pending[i].length for i in candidates]
        chosen = plan_batch(lengths, policy, self._pace.overhead_tokens)
        return self._queue.take(candidates[i] for i in chosen)

    async def _run_batch(
        self, batch: list[WorkItem], borrower: object, idle: list[PinnedThread], on_express: bool
    ) -> None:
        thread = idle.pop()
        try:
            await self._passes.run(batch, thread, on_express, self._express_policy is not None)
        finally:
            idle.append(thread)
            self._release(on_express, borrower)

    # -- failure and shutdown ---------------------------------------------------------

    def fail_all(self, error: BaseException) -> None:
        """Answer every queued text with ``error`` (used when the scheduler cannot go on)."""
        self._queue.fail_all(error)

    def close(self, deadline: float) -> int:
        """From now on, keep only the work that can finish by ``deadline`` (see
        :mod:`.drain`); returns how many requests were answered ShuttingDownError now."""
        refused = self._drain.close(deadline, self._policy.max_batch_tokens)
        self._wake.set()
        return refused

    def fail_everything(self, error: BaseException) -> None:
        """Answer every request still waiting, queued or in a pass, with ``error``."""
        self._drain.fail_everything(error)
        self._wake.set()


@attrs.frozen
class SchedulerStatistics:
    queued_items: int  # admitted texts not yet in a forward pass (or dropped)
    queued_tokens: int
    forwarded_items: int  # texts that reached the model
    passes_stopped_early: int  # stopped between layers: nobody waited any more
    express_passes: int
    express_open: bool
    consecutive_failures: int
    passes_observed: int
    pace_curve: Curve | None  # (t0 s, t1 s/token, t2 s/token²)
    pace_overhead_tokens: float


def unlimited_policy() -> BatchPolicy:
    """A placeholder policy used before the memory model is known (the gate is closed)."""
    return BatchPolicy(CONSERVATIVE, math.inf)
