"""What an engine's startup does besides the two steps of :mod:`.prepare`: the order
several engines keep in one process, the scheduler, the first pace, the readiness check,
and keeping a confirmed correction of the cost model.

Engines in one process share its memory limit and its peak-memory meter (the kernel's
high-water mark is per process). So every engine loads before any plans (the budget
counts every model's resident size), one engine probes at a time, and no gate opens
before every engine has planned (a served pass would disturb another engine's probe).
With one engine each of these is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator

import attrs
import trio

from bge_trio import metrics
from bge_trio.config import Settings
from bge_trio.memory.plan import MemoryPlan, store_correction, time_passes
from bge_trio.memory.probe import PeakMeter, ProbeProgress
from bge_trio.model.encoder import SCORE, Encoder
from bge_trio.scheduler.cores import Cores
from bge_trio.scheduler.scheduler import Scheduler
from bge_trio.scheduler.threads import ForwardThreads

log = logging.getLogger("bge_trio.engine")

# Distinct timed shapes that fit the pace's three terms (see PassPace.seed).
PACE_SHAPES = 3
Timed = tuple[tuple[int, int, float], ...]


class _Barrier:
    def __init__(self, parties: int) -> None:
        self._left = parties
        self._all = trio.Event()
        if parties <= 0:
            self._all.set()

    def arrive(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._all.set()

    async def wait(self) -> None:
        await self._all.wait()


@attrs.define
class _Member:
    """One engine's way through the order: it arrives at each stage once, and at every
    stage it never reached when it leaves (a failed engine holds nobody up)."""

    order: StartupOrder
    loaded: bool = False
    planned: bool = False

    async def arrive_loaded(self) -> None:
        if not self.loaded:
            self.loaded = True
            self.order._loaded.arrive()
        await self.order._loaded.wait()

    async def arrive_planned(self, express_reserve: float = 0.0) -> None:
        """Planned, with the bytes this model's worst express pass needs; returns once
        every engine has planned."""
        if not self.planned:
            self.planned = True
            order = self.order
            order.express_reserve = max(order.express_reserve, express_reserve)
            order._planned.arrive()
        await self.order._planned.wait()

    def leave(self) -> None:
        if not self.loaded:
            self.loaded = True
            self.order._loaded.arrive()
        if not self.planned:
            self.planned = True
            self.order._planned.arrive()


class StartupOrder:
    """The startup order of ``engines`` engines with ``forwards`` regular forward passes
    at once among them in all (they share the process's cores, see
    :mod:`bge_trio.scheduler.cores`), and the cores they share."""

    def __init__(self, engines: int, forwards: int, cores: Cores | None = None) -> None:
        self.engines = engines
        self.forwards = forwards
        self.cores = cores or Cores(forwards)
        # the largest worst express pass among the engines, once all have planned: the
        # one express lane's share of every pass's workspace
        self.express_reserve = 0.0
        self._loaded = _Barrier(engines)
        self._planned = _Barrier(engines)
        self._probing = trio.Lock()

    @contextlib.contextmanager
    def member(self) -> Iterator[_Member]:
        member = _Member(self)
        try:
            yield member
        finally:
            member.leave()

    @contextlib.asynccontextmanager
    async def planning(self) -> AsyncIterator[None]:
        """One engine plans (and probes) at a time."""
        async with self._probing:
            yield


async def pace_seed(threads: ForwardThreads, encoder: Encoder, memory: MemoryPlan) -> Timed:
    """The first pace: admission never judges the first requests without one.

    With one regular worker, the probe's timed passes (or, where it timed too few,
    passes timed now). With several, passes timed now on every worker at once, the
    slowest of each shape: passes that share the cores run slower than one alone
    (all-MiniLM-L6-v2, two workers on two cores: 0.3 ms per token alone, 0.5 side by
    side), and a pace learnt alone admits requests that then time out.
    """
    timed = memory.pass_seconds
    try:
        if len(threads.regular) > 1:
            side_by_side = await threads.run_each(time_passes, encoder)
            slowest = zip(*side_by_side, strict=True)
            return tuple(max(timings, key=lambda timing: timing[2]) for timings in slowest)
        if len({(batch, seq) for batch, seq, _ in timed}) >= PACE_SHAPES:
            return timed
        return await threads.run_first(time_passes, encoder)
    except Exception:  # the readiness check says whether the model can serve at all
        log.warning("could not time passes for a first pace", exc_info=True)
        return timed


def readiness_check(encoder: Encoder) -> None:
    """One real pass with every output the model has, before the gate opens."""
    if encoder.info.kind == "reranker":
        (scored,) = encoder.forward(encoder.pair_ids("readiness", ["check"]), SCORE)
        if scored.score is None or not math.isfinite(scored.score):
            raise RuntimeError("readiness check produced no score")
        return
    (result,) = encoder.forward(encoder.tokenize(["readiness check"]), encoder.info.outputs)
    if result.dense is None or not result.dense.any():
        raise RuntimeError("readiness check produced an empty embedding")


def scheduler_for(
    encoder: Encoder,
    settings: Settings,
    threads: ForwardThreads,
    model: str,
    corrections: trio.MemorySendChannel[float],
    cores: Cores,
) -> Scheduler:
    """The scheduler of a loaded model, its gate closed, on the engine's threads, sharing
    the process's ``cores`` with the other engines."""
    meter = PeakMeter()
    return Scheduler(
        encoder.forward,
        lanes=threads.lanes,
        forward_threads=threads,
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue_items=settings.max_queue_items,
        max_queue_tokens=settings.max_queue_tokens,
        max_wait_s=settings.request_timeout_s,
        observer=metrics.SchedulerMetrics(model),
        # served passes are measured where the kernel's high-water mark can be reset
        # (cheap); sampling every pass from a thread would cost too much
        meter=meter if meter.method == "vmhwm" else None,
        corrections=corrections,
        cores=cores,
    )


def log_probe_step(step: ProbeProgress) -> None:
    log.info(
        "probe %d/%d: batch %d x %d tokens peaked at %d bytes (%.1fs so far, ~%.0fs to go)",
        step.done,
        step.total,
        step.point.batch,
        step.point.seq,
        step.point.peak_bytes,
        step.elapsed_s,
        step.remaining_s,
    )


async def keep_correction(memory: MemoryPlan, settings: Settings, correction: float) -> None:
    """A confirmed correction of the cost model, kept so the next start begins with it."""
    try:
        path = await trio.to_thread.run_sync(store_correction, memory, settings, correction)
    except OSError as exc:
        log.warning("could not keep the corrected cost model in the probe cache (%s)", exc)
        return
    if path is not None:
        log.info("corrected cost model (x%.3f) kept in %s", correction, path)
