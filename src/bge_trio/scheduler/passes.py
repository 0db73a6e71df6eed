"""Forward passes in flight: each on its lane's pinned thread, measured when it runs
alone, stopped between layers when nobody waits for it any more, its results (or a
:class:`~bge_trio.errors.BatchFailed`) handed to the requests' tickets. A pass that was
measured returns its peak to the scheduler, which owns the cost model it is checked
against."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import attrs
import trio

from bge_trio.errors import batch_failed
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import BetweenLayers, Embedding, Output, PassAbandoned
from bge_trio.scheduler.cores import Cores
from bge_trio.scheduler.lanes import EXPRESS_LINGER_S, LONG_PASS_S, Lanes
from bge_trio.scheduler.pace import PassPace
from bge_trio.scheduler.threads import PinnedThread
from bge_trio.scheduler.work import WorkItem

log = logging.getLogger("bge_trio.scheduler.scheduler")

# (token ids, outputs, the between-layers hook, whether the pass is on the express lane)
Runner = Callable[
    [Sequence[Sequence[int]], frozenset[Output], BetweenLayers, bool], list[Embedding]
]


class PassObserver(Protocol):
    def batch_started(self, items: int, padded_tokens: int, waits_s: list[float]) -> None: ...

    def batch_finished(self, seconds: float, ok: bool) -> None: ...


@attrs.frozen
class Peak:
    """A pass that ran alone and what it peaked at above the resident size before it."""

    batch: int
    seq: int  # padded length
    bytes: int


@attrs.frozen(eq=False)
class Running:
    batch: list[WorkItem]
    started: float
    predicted: float | None  # seconds, at the learnt pace
    on_express: bool


class Passes:
    def __init__(
        self,
        runner: Runner,
        lanes: Lanes,
        pace: PassPace,
        observer: PassObserver,
        *,
        meter: PeakMeter | None,
        set_threads: Callable[[int], None],
        cores: Cores,
    ) -> None:
        self._runner = runner
        self._lanes = lanes
        self._pace = pace
        self._observer = observer
        # Per-pass peaks: the kernel's high-water mark is per process, so only a pass
        # that started and ended with no other pass (of any engine) in flight is measured.
        self._meter = meter
        self._set_threads = set_threads
        self._cores = cores  # the express lane and the passes in flight, process-wide
        self.running: dict[int, Running] = {}  # by id of their batch
        self.forwarded_items = 0  # texts that reached the model
        self.stopped_early = 0  # stopped between layers: nobody waited any more
        self.express_passes = 0
        self.consecutive_failures = 0

    def seconds_left(self) -> float:
        """The predicted time the regular passes running now have left (admission counts it)."""
        now = trio.current_time()
        return sum(
            max(0.0, run.predicted - (now - run.started))
            for run in self.running.values()
            if not run.on_express and run.predicted is not None
        )

    async def run(
        self, batch: list[WorkItem], thread: PinnedThread, on_express: bool, express_open: bool
    ) -> Peak | None:
        """One pass of ``batch`` on ``thread``; every outcome reaches the tickets. Returns
        the pass's peak when it ran alone and was measured."""
        started = trio.current_time()
        width = max(item.length for item in batch)
        padded = len(batch) * width
        predicted = self._pace.predict(len(batch), width)
        self.running[id(batch)] = Running(batch, started, predicted, on_express)
        try:
            outputs: frozenset[Output] = frozenset().union(*(i.ticket.outputs for i in batch))
            self.forwarded_items += len(batch)
            self.express_passes += on_express
            self._observer.batch_started(
                len(batch), padded, [started - item.enqueued_at for item in batch]
            )
            between = self._between_layers(batch, on_express, express_open, predicted)
            results, peak = await self._forward(thread, batch, outputs, between, on_express)
        except PassAbandoned:
            self.stopped_early += 1
            self._observer.batch_finished(trio.current_time() - started, ok=True)
            log.info(
                "stopped a pass of %d texts (%d tokens) between layers: nobody waits for it",
                len(batch),
                padded,
            )
        except Exception as exc:
            self._observer.batch_finished(trio.current_time() - started, ok=False)
            self.consecutive_failures += 1
            log.exception("forward pass of %d texts failed", len(batch))
            for ticket in {id(item.ticket): item.ticket for item in batch}.values():
                failed = batch_failed()
                failed.__cause__ = exc  # for the log; the client gets a generic 500
                ticket.fail(failed)
        else:
            self._delivered(batch, results, started, on_express, width)
            return peak
        finally:
            del self.running[id(batch)]
        return None

    def _delivered(
        self,
        batch: list[WorkItem],
        results: list[Embedding],
        started: float,
        on_express: bool,
        width: int,
    ) -> None:
        elapsed = trio.current_time() - started
        self._observer.batch_finished(elapsed, ok=True)
        if not on_express and not self._cores.express_busy:
            # express passes and regular ones that shared the cores run slower than
            # a regular pass alone, which is what admission estimates
            self._pace.observe(len(batch) * width, elapsed, seq=width)
        for ticket in {id(item.ticket): item.ticket for item in batch}.values():
            ticket.inference_s += elapsed
        for item in batch:
            item.ticket.queue_s = max(item.ticket.queue_s, started - item.enqueued_at)
        self.consecutive_failures = 0
        for item, result in zip(batch, results, strict=True):
            item.ticket.deliver(item.index, result)

    def _between_layers(
        self, batch: list[WorkItem], on_express: bool, express_open: bool, predicted: float | None
    ) -> BetweenLayers:
        """Runs on the pass's thread before each layer: stop if nobody waits, pick threads."""
        lanes = self._lanes
        width = max(item.length for item in batch)
        first = [
            express_open
            and width > lanes.express_tokens
            and (predicted is None or predicted > LONG_PASS_S)
        ]

        def between_layers() -> None:
            if all(item.abandoned for item in batch):
                raise PassAbandoned
            if on_express:
                self._set_threads(lanes.express_threads)
                return
            cores = self._cores
            sharing = (
                cores.express_busy or time.monotonic() - cores.express_ended < EXPRESS_LINGER_S
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
        on_express: bool,
    ) -> tuple[list[Embedding], Peak | None]:
        """Run the pass, measuring its peak when it runs alone."""
        ids = [item.token_ids for item in batch]
        cores = self._cores
        alone = cores.in_flight == 0
        cores.in_flight += 1
        cores.started += 1
        generation = cores.started
        try:
            if not alone or self._meter is None:
                plain: list[Embedding] = await thread.run(
                    self._runner, ids, outputs, between_layers, on_express
                )
                return plain, None
            results: list[Embedding]
            peak: int
            results, peak = await thread.run(
                self._meter.measure_pass,
                partial(self._runner, ids, outputs, between_layers, on_express),
            )
        finally:
            cores.in_flight -= 1
        if generation != cores.started:  # another pass started meanwhile
            return results, None
        return results, Peak(len(batch), max(item.length for item in batch), peak)
