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

The scheduler owns everything a request meets on its way to the model: the inference
gate (closed while startup measures memory), the queue, admission, the passes, the
drain at shutdown, and the cost model the passes are planned with. A pass that ran
alone comes back with its measured peak; one above its prediction corrects the cost
model here (see :mod:`bge_trio.memory.recalibrate`), and a confirmed correction is
sent on the ``corrections`` channel for whoever keeps it. Refusals and failures are
the domain errors of :mod:`bge_trio.errors`, raised here, where they are known.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import attrs
import trio

from bge_trio.errors import gate_closed, shutting_down
from bge_trio.memory.probe import PeakMeter
from bge_trio.memory.recalibrate import Drift
from bge_trio.model.encoder import Embedding, Output, set_threads
from bge_trio.scheduler.admission import Admission, Bounds, Curve
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.calibration import Calibration, unlimited_policy
from bge_trio.scheduler.cores import Cores
from bge_trio.scheduler.drain import Drain
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.lanes import Lanes, plan_lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.passes import Passes, Peak, Runner
from bge_trio.scheduler.queue import WorkQueue
from bge_trio.scheduler.threads import ForwardThreads, PinnedThread
from bge_trio.scheduler.work import Ticket, WorkItem

__all__ = ["Runner", "Scheduler", "SchedulerStatistics", "Served"]

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Receives what the scheduler does, for metrics."""

    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None: ...

    def batch_finished(self, seconds: float, ok: bool) -> None: ...

    def queue_changed(self, items: int, tokens: int) -> None: ...

    def correction_changed(self, factor: float) -> None: ...


class _Unobserved:
    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None:
        pass

    def batch_finished(self, seconds: float, ok: bool) -> None:
        pass

    def queue_changed(self, items: int, tokens: int) -> None:
        pass

    def correction_changed(self, factor: float) -> None:
        pass


@attrs.frozen(eq=False)
class Served:
    """A request's results in input order, and where its time went: waiting for a pass
    (the longest any of its texts waited) and in the passes its texts were in."""

    results: list[Embedding]
    queue_s: float
    inference_s: float


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        policy: BatchPolicy | None = None,
        *,
        lanes: Lanes | None = None,
        forward_threads: ForwardThreads | None = None,
        batch_wait_s: float = 0.002,
        max_queue_items: int = 4096,
        max_queue_tokens: int = 1 << 20,
        max_wait_s: float = math.inf,
        observer: Observer | None = None,
        meter: PeakMeter | None = None,
        corrections: trio.MemorySendChannel[float] | None = None,
        threads: Callable[[int], None] = set_threads,
        cores: Cores | None = None,
    ) -> None:
        self.lanes = lanes = lanes or plan_lanes(1, 1, express_tokens=0)
        self._gate = Gate(lanes.workers)  # closed until open()
        # the process's cores, shared with the other engines' schedulers (if any)
        self._cores = cores = cores or Cores(lanes.workers)
        self._forward_threads = forward_threads or ForwardThreads(lanes)
        self._set_threads = threads
        self._observer = observer = observer or _Unobserved()
        self._calibration = Calibration(
            policy or unlimited_policy(), lanes.express_tokens, observer, corrections
        )
        self._measured = 0  # passes that ran alone and were measured
        self._last_measured: Peak | None = None
        self._batch_wait_s = batch_wait_s
        self._pace = pace = PassPace()
        self._queue = queue = WorkQueue(observer)
        self._passes = passes = Passes(
            runner, lanes, pace, observer, meter=meter, set_threads=threads, cores=cores
        )
        bounds = Bounds(max_queue_items, max_queue_tokens, max_wait_s)
        self._admission = Admission(queue, pace, lanes, bounds, passes.seconds_left, self._others_s)
        self._drain = Drain(queue, passes, self._gate, pace)
        self._wake = trio.Event()  # set when work arrives or a lane frees up
        self._arriving = 0  # requests being tokenised, about to submit
        cores.join(id(self), lambda: self._wake.set(), self._backlog_s)

    def _backlog_s(self) -> float:
        """Seconds of work this scheduler has running and queued (other engines' admission
        counts it)."""
        return self._passes.seconds_left() + self._admission.queued_s(self.policy)

    def _others_s(self) -> float:
        """Seconds of work every other engine of the process has running and queued."""
        return self._cores.others_backlog_s(id(self))

    # -- the memory plan, the pace, the gate, statistics ------------------------------

    @property
    def policy(self) -> BatchPolicy:
        """The limits of regular passes (the given policy less the express lane's share)."""
        return self._calibration.regular

    @property
    def express_policy(self) -> BatchPolicy | None:
        """The limits of express passes; None while the express lane is shut."""
        return self._calibration.express

    @property
    def given_policy(self) -> BatchPolicy:
        """The policy in force, before the express lane's share is set aside."""
        return self._calibration.given

    def set_policy(self, policy: BatchPolicy, express_reserve: float | None = None) -> None:
        """Plan passes with ``policy`` from now on: the memory plan's limits, which served
        passes then check (a correction multiplies its cost model). ``express_reserve``:
        the bytes set aside for the process's express lane (None: this model's own worst
        express pass)."""
        self._calibration.plan(policy, express_reserve)

    def seed_pace(self, passes: Iterable[tuple[int, int, float]]) -> None:
        """Start the pace afresh from (batch, seq, seconds) passes timed elsewhere."""
        self._pace.seed(passes)

    def predict_seconds(self, batch: int, seq: int) -> float | None:
        """How long a pass of ``batch`` texts padded to ``seq`` takes (None: unknown yet)."""
        return self._pace.predict(batch, seq)

    def open(self) -> None:
        """Let forward passes run (startup is over, whatever its outcome; idempotent)."""
        self._gate.open()

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of what the scheduler holds and has done."""
        passes = self._passes
        return SchedulerStatistics(
            gate_open=self._gate.is_open,
            queued_items=self._queue.items,
            queued_tokens=self._queue.tokens,
            forwarded_items=passes.forwarded_items,
            passes_stopped_early=passes.stopped_early,
            express_passes=passes.express_passes,
            express_open=self.express_policy is not None,
            consecutive_failures=passes.consecutive_failures,
            passes_observed=self._pace.passes,
            pace_curve=self._pace.curve(),
            pace_overhead_tokens=self._pace.overhead_tokens,
            passes_measured=self._measured,
            last_measured=self._last_measured,
            drift=self._calibration.drift(),
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
        *,
        gate_deadline: float = math.inf,
    ) -> Served:
        """Queue every text of one request and wait for all results, in input order.

        Refusals are raised before anything is queued (TooSlow, Overloaded, ShuttingDown).
        While the gate is still closed (startup), the texts wait for it until
        ``gate_deadline`` (then NotReady). If the caller is cancelled, the request's texts
        that have not started yet are dropped, and a pass whose texts are all dropped
        stops at its next layer. A failed pass raises BatchFailed; a request that cannot
        finish by the drain's deadline, ShuttingDown.
        """
        lengths = [len(ids) for ids in token_lists]
        if self._drain.refuses(lengths, self.policy.max_batch_tokens):
            raise shutting_down()
        self._admission.admit(lengths, self.policy, self.express_policy is not None)
        ticket = Ticket(outputs, len(token_lists))
        now = trio.current_time()
        # All at once, no checkpoint: the scheduler must see a request's texts together,
        # or it plans a pass from the first few and the rest wait for the next.
        self._queue.add([WorkItem(ticket, i, ids, now) for i, ids in enumerate(token_lists)])
        self._wake.set()
        with self._gate.until(gate_deadline) as waited:
            try:
                await ticket.done.wait()
            except BaseException:
                ticket.cancelled = True
                self._wake.set()
                raise
        if waited.cancelled_caught:
            raise gate_closed()
        if ticket.error is not None:
            raise ticket.error
        results = [r for r in ticket.results if r is not None]
        return Served(results, ticket.queue_s, ticket.inference_s)

    def expected_wait_s(self, lengths: Sequence[int] = ()) -> float:
        """How long the queue plus texts of ``lengths`` take at the learnt pace; 0 if unknown."""
        express_open = self.express_policy is not None
        return self._admission.expected_wait_s(lengths, self.policy, express_open)

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
                    self._cores.stop_waiting(id(self))
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
            except trio.WouldBlock:
                pass
            else:
                if self._cores.try_regular(id(self), borrower):
                    return False
                self._gate.limiter.release_on_behalf_of(borrower)
            if self._express_work():
                self._cores.reserve_express()
                return True
            await self._changed()

    def _express_work(self) -> bool:
        if self.express_policy is None or self._cores.express_busy:
            return False
        limit = self.lanes.express_tokens
        return any(item.length <= limit and not item.abandoned for item in self._queue.pending)

    def _release(self, on_express: bool, borrower: object, seconds: float = 0.0) -> None:
        """Give the lane back; ``seconds``: how long its pass ran (none: 0)."""
        if on_express:
            self._cores.release_express()
        else:
            self._gate.limiter.release_on_behalf_of(borrower)
            self._cores.release_regular(id(self), borrower, seconds)
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
        overhead = self._pace.overhead_tokens
        if not on_express:
            return self._queue.take_planned(self.policy, overhead)
        assert self.express_policy is not None
        return self._queue.take_planned(self.express_policy, overhead, self.lanes.express_tokens)

    async def _run_batch(
        self, batch: list[WorkItem], borrower: object, idle: list[PinnedThread], on_express: bool
    ) -> None:
        thread = idle.pop()
        started = trio.current_time()
        try:
            express_open = self.express_policy is not None
            peak = await self._passes.run(batch, thread, on_express, express_open)
        finally:
            idle.append(thread)
            self._release(on_express, borrower, trio.current_time() - started)
        if peak is not None:
            self._measured += 1
            self._last_measured = peak
            self._calibration.measured(peak)

    # -- failure and shutdown ---------------------------------------------------------

    def fail_all(self, error: BaseException) -> None:
        """Answer every queued text with ``error`` (used when the scheduler cannot go on)."""
        self._queue.fail_all(error)

    def close(self, deadline: float) -> int:
        """From now on, keep only the work that can finish by ``deadline`` (see
        :mod:`.drain`); returns how many requests were answered ShuttingDown now."""
        refused = self._drain.close(deadline, self.policy.max_batch_tokens)
        self._wake.set()
        return refused

    def fail_everything(self, error: BaseException) -> None:
        """Answer every request still waiting, queued or in a pass, with ``error``."""
        self._drain.fail_everything(error)
        self._wake.set()


@attrs.frozen
class SchedulerStatistics:
    gate_open: bool
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
    passes_measured: int  # ran alone, their peak read
    last_measured: Peak | None
    drift: Drift  # what the measured passes large enough to count said about the cost model
