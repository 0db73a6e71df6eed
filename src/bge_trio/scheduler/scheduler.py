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
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import attrs
import trio

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import BetweenLayers, Embedding, Output, PassAbandoned, set_threads
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.lanes import EXPRESS_LINGER_S, LONG_PASS_S, Lanes, plan_lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.threads import PinnedThread
from bge_trio.scheduler.work import Ticket, WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")

Runner = Callable[[Sequence[Sequence[int]], frozenset[Output], BetweenLayers], list[Embedding]]
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

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(RuntimeError):
    """The process is stopping: the request was refused, or cannot finish in time (a 503)."""


class TooSlowError(RuntimeError):
    """One text of the request alone would run past the deadline (a 413 for the client)."""

    def __init__(self, index: int, tokens: int, estimate_s: float, deadline_s: float) -> None:
        super().__init__(f"input[{index}] would take about {estimate_s:.0f} s")
        self.index = index
        self.tokens = tokens
        self.estimate_s = estimate_s
        self.deadline_s = deadline_s


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        gate: Gate,
        policy: BatchPolicy,
        *,
        lanes: Lanes | None = None,
        batch_wait_s: float = 0.002,
        max_queue_items: int = 4096,
        max_queue_tokens: int = 1 << 20,
        max_wait_s: float = math.inf,
        observer: Observer | None = None,
        meter: PeakMeter | None = None,
        on_peak: PeakListener | None = None,
        threads: Callable[[int], None] = set_threads,
    ) -> None:
        self._runner = runner
        self._gate = gate
        self.lanes = lanes or plan_lanes(gate.workers, gate.workers, express_tokens=0)
        self._set_threads = threads
        self._policy = policy
        self._given_policy = policy  # before the express lane's share is set aside
        self._express_policy: BatchPolicy | None = None
        self.set_policy(policy)
        self._batch_wait_s = batch_wait_s
        self.max_queue_items = max_queue_items
        self.max_queue_tokens = max_queue_tokens
        self.max_wait_s = max_wait_s
        self._pace = PassPace()
        self._pending: list[WorkItem] = []  # oldest first
        self._wake = trio.Event()  # set when work arrives or a lane frees up
        self._observer: Observer = observer or _Unobserved()
        self._queued_items = 0  # admitted texts not yet in a forward pass (or dropped)
        self._queued_tokens = 0
        self._forwarded_items = 0  # texts that reached the model, for observability
        self._abandoned_passes = 0  # stopped between layers: nobody waited any more
        self._express_passes = 0
        self._consecutive_failures = 0
        self._threads: list[PinnedThread] = []  # while run() runs
        self._express_busy = False
        self._express_ended = -math.inf  # time.monotonic(): read on the forward threads
        self._arriving = 0  # requests being tokenised, about to submit
        # Per-pass peaks: the kernel's high-water mark is per process, so only a pass
        # that started and ended with no other pass in flight is measured.
        self._meter = meter
        self._on_peak = on_peak
        self._in_flight = 0
        self._passes_started = 0
        self._running: dict[int, _Running] = {}  # passes in flight, by id of their batch
        self._drain_deadline: float | None = None  # set once the process is stopping

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

    def seed_pace(self, passes: Iterable[tuple[int, int, float]]) -> None:
        """Start the pace from (batch, seq, seconds) passes timed elsewhere (the probe)."""
        self._pace.seed(passes)

    def predict_seconds(self, batch: int, seq: int) -> float | None:
        """How long a pass of ``batch`` texts padded to ``seq`` takes (None: unknown yet)."""
        return self._pace.predict(batch, seq)

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of what the scheduler holds and has done."""
        return SchedulerStatistics(
            queued_items=self._queued_items,
            queued_tokens=self._queued_tokens,
            forwarded_items=self._forwarded_items,
            passes_stopped_early=self._abandoned_passes,
            express_passes=self._express_passes,
            express_open=self._express_policy is not None,
            consecutive_failures=self._consecutive_failures,
            passes_observed=self._pace.passes,
            pace_curve=self._pace.curve(),
            pace_overhead_tokens=self._pace.overhead_tokens,
        )

    def set_policy(self, policy: BatchPolicy) -> None:
        """The limits of regular passes, and of express passes beside them.

        An express pass runs beside a regular one, so its worst case (one text of
        ``express_tokens``, or that many padded tokens of shorter ones) is set aside
        from the regular workspace. Where that would take more than a tenth of it, the
        express lane stays shut: memory comes first.
        """
        self._given_policy = policy
        tokens = self.lanes.express_tokens
        reserve = policy.cost.predict(1, tokens) if tokens else math.inf
        if tokens and reserve <= 0.1 * policy.workspace_bytes:
            self._express_policy = BatchPolicy(
                policy.cost, reserve, max_batch_tokens=tokens, max_batch_items=tokens
            )
            self._policy = attrs.evolve(policy, workspace_bytes=policy.workspace_bytes - reserve)
        else:
            self._express_policy = None
            self._policy = policy

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
        dropped, and a pass whose texts are all dropped stops at its next layer. A
        failed forward pass raises BatchFailedError. Once the process is stopping, a
        request that cannot finish by the drain's deadline raises ShuttingDownError.
        """
        if self._drain_deadline is not None:
            _, free, curve = self._schedule()
            if self._finish(free, [len(ids) for ids in token_lists], curve) > self._drain_deadline:
                raise ShuttingDownError("shutting down")
        self._admit(token_lists)
        ticket = Ticket(outputs, len(token_lists))
        now = trio.current_time()
        # All at once, no checkpoint: the scheduler must see a request's texts together,
        # or it plans a pass from the first few and the rest wait for the next.
        self._pending.extend(
            WorkItem(ticket, index, ids, now) for index, ids in enumerate(token_lists)
        )
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

    def _admit(self, token_lists: Sequence[Sequence[int]]) -> None:
        """All or nothing: a request is queued whole, or refused whole.

        A text that alone would run past the deadline is refused (TooSlowError) even
        on an idle server; otherwise an empty queue admits any request, so one larger
        than the bounds still runs when the server is otherwise idle.
        """
        lengths = [len(ids) for ids in token_lists]
        for index, length in enumerate(lengths):
            alone = self._pace.predict(1, length)
            if alone is not None and alone > self.max_wait_s:
                raise TooSlowError(index, length, alone, self.max_wait_s)
        items = len(lengths)
        tokens = sum(lengths)
        if self._queued_items:
            wait = self.expected_wait_s(lengths)
            if (
                self._queued_items + items > self.max_queue_items
                or self._queued_tokens + tokens > self.max_queue_tokens
                or wait > self.max_wait_s
            ):
                raise QueueFullError(
                    f"{self._queued_items} texts ({self._queued_tokens} tokens) are already "
                    f"queued; this request would finish in about {wait:.0f} s",
                    retry_after_s=max(1.0, wait - self.max_wait_s),
                )
        self._queued_items += items
        self._queued_tokens += tokens
        self._observer.queue_changed(self._queued_items, self._queued_tokens)

    def expected_wait_s(self, lengths: Sequence[int] = ()) -> float:
        """How long the queue plus texts of ``lengths`` take at the learnt pace; 0 if unknown.

        A request that would wait longer than its deadline is better refused now (429,
        retry elsewhere) than accepted and timed out later (504, work wasted). Texts
        short enough for the express lane do not wait behind the long ones; only the
        short work queued counts for them.
        """
        curve = self._pace.curve()
        if curve is None:
            return 0.0
        t0, t1, t2 = curve
        express = self._express_policy is not None and all(
            length <= self.lanes.express_tokens for length in lengths
        )
        queued = [
            item.length
            for item in self._pending
            if not express or item.length <= self.lanes.express_tokens
        ]
        everything = [*queued, *lengths]
        tokens = sum(everything)
        work = sum(length * length for length in everything)
        cap = self._policy.max_batch_tokens or tokens or 1
        passes = 1 + tokens // cap
        lanes = self.lanes.workers + (1 if express else 0)
        return (passes * t0 + tokens * t1 + work * t2) / lanes

    def _dequeue(self, items: Sequence[WorkItem]) -> None:
        self._queued_items -= len(items)
        self._queued_tokens -= sum(item.length for item in items)
        self._observer.queue_changed(self._queued_items, self._queued_tokens)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler loop; runs until cancelled."""
        lanes = self.lanes
        # One pinned thread per gate token: holding a token means a thread is free.
        idle = [PinnedThread(f"bge-trio-forward-{i}") for i in range(self._gate.workers)]
        express = PinnedThread("bge-trio-express") if lanes.express else None
        threads = [*idle, *([express] if express else [])]
        try:
            for thread in idle:
                await thread.run(self._set_threads, lanes.threads)
            if express is not None:
                await express.run(self._set_threads, lanes.express_threads)
            self._threads = list(idle)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    while not self._pending:
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
                        assert express is not None
                        self._express_busy = True
                        nursery.start_soon(self._run_batch, batch, borrower, [express], True)
                    else:
                        nursery.start_soon(self._run_batch, batch, borrower, idle, False)
        finally:
            self._threads = []
            for thread in threads:
                thread.close()

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
                self._express_busy = True
                return True
            await self._changed()

    def _express_work(self) -> bool:
        if self._express_policy is None or self._express_busy:
            return False
        limit = self.lanes.express_tokens
        return any(item.length <= limit and not item.abandoned for item in self._pending)

    def _release(self, on_express: bool, borrower: object) -> None:
        if on_express:
            self._express_busy = False
            self._express_ended = time.monotonic()
        else:
            self._gate.limiter.release_on_behalf_of(borrower)
        self._wake.set()

    def fail_all(self, error: BaseException) -> None:
        """Answer every queued text with ``error`` (used when the scheduler cannot go on)."""
        for item in self._pending:
            item.ticket.fail(error)
        self._dequeue(self._pending)
        self._pending = []

    def close(self, deadline: float) -> int:
        """From now on, keep only the work that can finish by ``deadline``.

        Returns how many requests were answered ShuttingDownError now. A request is kept only if
        its texts' passes, queued in order on the regular workers at the learnt pace,
        end before the deadline; requests still on their way (being tokenised) are
        judged the same way when they submit. Before the pace is known (startup) nothing
        queued can be promised. A pass whose requests are all answered stops at its
        next layer.
        """
        self._drain_deadline = deadline
        finishes, _, _ = self._schedule()
        doomed = {
            id(ticket): ticket
            for ticket, finish in finishes
            if not ticket.finished and finish > deadline
        }
        for ticket in doomed.values():
            ticket.fail(ShuttingDownError("shutting down"))
        self._wake.set()
        return len(doomed)

    def fail_everything(self, error: BaseException) -> None:
        """Answer every request still waiting, queued or in a pass, with ``error``."""
        for running in self._running.values():
            for item in running.batch:
                item.ticket.fail(error)
        self.fail_all(error)
        self._wake.set()

    def _schedule(
        self,
    ) -> tuple[list[tuple[Ticket, float]], list[float], tuple[float, float, float]]:
        """When each waiting text's pass should end, oldest first; when each regular
        worker is free after all of them; and the pace curve used.

        Texts waiting at the closed gate (startup) have no end in sight (inf). Where
        the pace is not yet known, a pass is assumed to end now: kept, and answered
        at the drain's deadline if it has not finished by then.
        """
        now = trio.current_time()
        curve = self._pace.curve() or (0.0, 0.0, 0.0)
        if not self._gate.is_open:
            return [(item.ticket, math.inf) for item in self._pending], [], curve
        finishes: list[tuple[Ticket, float]] = []
        free = [now] * self._gate.workers
        for running in self._running.values():
            end = now if running.predicted is None else running.started + running.predicted
            if not running.on_express:
                free[free.index(min(free))] = max(end, now)
            finishes.extend((item.ticket, end) for item in running.batch)
        for item in self._pending:
            finishes.append((item.ticket, self._finish(free, [item.length], curve)))
        return finishes, free, curve

    def _finish(
        self, free: list[float], lengths: Sequence[int], curve: tuple[float, float, float]
    ) -> float:
        """Queue texts of ``lengths`` on the earliest free workers (updating ``free``) at
        the pace ``curve``; when the last one ends. No workers (gate closed): never."""
        if not free:
            return math.inf
        t0, t1, t2 = curve
        cap = self._policy.max_batch_tokens or math.inf
        end = -math.inf
        for length in lengths:
            lane = free.index(min(free))
            free[lane] += t0 * min(1.0, length / cap) + t1 * length + t2 * length * length
            end = max(end, free[lane])
        return end

    async def _gather_company(self) -> None:
        """While requests are on their way, let them join, up to ``batch_wait_s``
        after the oldest text queued."""
        if not self._pending or self._batch_wait_s <= 0:
            return
        deadline = self._pending[0].enqueued_at + self._batch_wait_s
        with trio.move_on_at(deadline):
            while self._arriving:
                await self._changed()

    def _take_batch(self, on_express: bool) -> list[WorkItem]:
        dropped = [item for item in self._pending if item.abandoned]
        if dropped:
            self._dequeue(dropped)
            self._pending = [item for item in self._pending if not item.abandoned]
        if on_express:
            assert self._express_policy is not None
            policy = self._express_policy
            limit = self.lanes.express_tokens
            candidates = [i for i, item in enumerate(self._pending) if item.length <= limit]
        else:
            policy = self._policy
            candidates = list(range(len(self._pending)))
        if not candidates:
            return []
        lengths = [self._pending[i].length for i in candidates]
        chosen = {candidates[i] for i in plan_batch(lengths, policy, self._pace.overhead_tokens)}
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [item for i, item in enumerate(self._pending) if i not in chosen]
        self._dequeue(batch)
        return batch

    async def _run_batch(
        self,
        batch: list[WorkItem],
        borrower: object,
        idle: list[PinnedThread],
        on_express: bool,
    ) -> None:
        thread = idle.pop()
        started = trio.current_time()
        width = max(item.length for item in batch)
        padded = len(batch) * width
        predicted = self._pace.predict(len(batch), width)
        self._running[id(batch)] = _Running(batch, started, predicted, on_express)
        try:
            outputs: frozenset[Output] = frozenset().union(*(i.ticket.outputs for i in batch))
            self._forwarded_items += len(batch)
            self._express_passes += on_express
            self._observer.batch_started(
                len(batch), padded, [started - item.enqueued_at for item in batch]
            )
            results = await self._forward(
                thread, batch, outputs, self._between_layers(batch, on_express, predicted)
            )
        except PassAbandoned:
            self._abandoned_passes += 1
            self._observer.batch_finished(trio.current_time() - started, ok=True)
            log.info(
                "stopped a pass of %d texts (%d tokens) between layers: nobody waits for it",
                len(batch),
                padded,
            )
        except Exception as exc:
            self._observer.batch_finished(trio.current_time() - started, ok=False)
            self._consecutive_failures += 1
            log.exception("forward pass of %d texts failed", len(batch))
            for item in batch:
                item.ticket.fail(exc)
        else:
            elapsed = trio.current_time() - started
            self._observer.batch_finished(elapsed, ok=True)
            if not on_express and not self._express_busy:
                # express passes and regular ones that shared the cores run slower than
                # a regular pass alone, which is what admission estimates
                self._pace.observe(padded, elapsed, seq=width)
            for ticket in {id(item.ticket): item.ticket for item in batch}.values():
                ticket.inference_s += elapsed
            for item in batch:
                item.ticket.queue_s = max(item.ticket.queue_s, started - item.enqueued_at)
            self._consecutive_failures = 0
            for item, result in zip(batch, results, strict=True):
                item.ticket.deliver(item.index, result)
        finally:
            del self._running[id(batch)]
            idle.append(thread)
            self._release(on_express, borrower)

    def _between_layers(
        self, batch: list[WorkItem], on_express: bool, predicted: float | None
    ) -> BetweenLayers:
        """Runs on the pass's thread before each layer: stop if nobody waits, pick threads."""
        lanes = self.lanes
        width = max(item.length for item in batch)
        first = [
            self._express_policy is not None
            and width > lanes.express_tokens
            and (predicted is None or predicted > LONG_PASS_S)
        ]

        def between_layers() -> None:
            if all(item.abandoned for item in batch):
                raise PassAbandoned
            if on_express:
                self._set_threads(lanes.express_threads)
                return
            sharing = (
                self._express_busy or time.monotonic() - self._express_ended < EXPRESS_LINGER_S
            )
            if first:
                sharing = first.pop() or sharing
            self._set_threads(lanes.shared_threads if sharing else lanes.threads)

        return between_layers

    async def _forward(
        self,
        thread: PinnedThread,
        batch: list[WorkItem],
        outputs: frozenset[Output],
        between_layers: BetweenLayers,
    ) -> list[Embedding]:
        """Run the pass, measuring its peak when it runs alone."""
        ids = [item.token_ids for item in batch]
        alone = self._in_flight == 0
        self._in_flight += 1
        self._passes_started += 1
        generation = self._passes_started
        try:
            if not (alone and self._meter is not None and self._on_peak is not None):
                plain: list[Embedding] = await thread.run(
                    self._runner, ids, outputs, between_layers
                )
                return plain
            results: list[Embedding]
            peak: int
            results, peak = await thread.run(
                self._meter.measure_pass, partial(self._runner, ids, outputs, between_layers)
            )
        finally:
            self._in_flight -= 1
        if generation == self._passes_started:  # no other pass started meanwhile
            self._on_peak(len(batch), max(item.length for item in batch), peak)
        return results


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
    pace_curve: tuple[float, float, float] | None  # (t0 s, t1 s/token, t2 s/token²)
    pace_overhead_tokens: float


@attrs.frozen(eq=False)
class _Running:
    batch: list[WorkItem]
    started: float
    predicted: float | None  # seconds, at the learnt pace
    on_express: bool


def unlimited_policy() -> BatchPolicy:
    """A placeholder policy used before the memory model is known (the gate is closed)."""
    return BatchPolicy(CONSERVATIVE, math.inf)
