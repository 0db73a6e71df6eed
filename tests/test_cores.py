"""The cores of one process, shared by the schedulers of the models it serves: no more
regular passes at once than workers, turns taken pass by pass, one express lane whose
reserve is the largest any model needs."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
import trio
import trio.testing

from bge_trio.memory.cost import CostModel
from bge_trio.model.encoder import DENSE, BetweenLayers, Embedding, Encoder, Output
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.cores import Cores
from bge_trio.scheduler.lanes import express_share, plan_lanes
from bge_trio.scheduler.scheduler import Scheduler

T = TypeVar("T")


class SharedLog:
    """The real tiny model behind two engines, recording whose pass ran when, and how
    many passes ran at once."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.order: list[str] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def runner(self, name: str):  # type: ignore[no-untyped-def]
        def run(
            batch: Sequence[Sequence[int]],
            outputs: frozenset[Output],
            between_layers: BetweenLayers | None = None,
            express: bool = False,
        ) -> list[Embedding]:
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
                self.order.append(name)
            try:
                return self.encoder.forward(batch, outputs, between_layers, express)
            finally:
                with self._lock:
                    self.running -= 1

        return run


def test_two_engines_on_one_worker_share_it_and_never_run_two_passes_at_once(
    tiny_encoder: Encoder,
) -> None:
    """A long queue of one model (six passes) and three passes of another arriving
    behind it: the second's passes are not left until the first's are all done."""
    log = SharedLog(tiny_encoder)
    cores = Cores(workers=1)
    lanes = plan_lanes(1, 1, express_tokens=0)
    one_text = BatchPolicy(CostModel(1.0, 0.0), 48.0)  # one 48-token text per pass
    text = [0, *range(5, 51), 2]

    async def main() -> None:
        first, second = (
            Scheduler(log.runner(name), one_text, lanes=lanes, cores=cores, batch_wait_s=0)
            for name in ("first", "second")
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await nursery.start(second.run)
            async with trio.open_nursery() as clients:
                for scheduler, count in ((first, 6), (second, 3)):
                    for _ in range(count):
                        clients.start_soon(scheduler.submit, [text], DENSE)
                await trio.testing.wait_all_tasks_blocked()
                first.open()  # everything queued: one model starts, the other waits
                second.open()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert log.most == 1  # one worker in the whole process
    assert set(log.order[:2]) == {"first", "second"}  # whichever opened first, then the other
    last_second = max(i for i, name in enumerate(log.order) if name == "second")
    assert last_second < len(log.order) - 1  # done before the first's long queue


def _turns(cores: Cores, first: int, cost: dict[int, float], passes: int) -> list[int]:
    """Engines that always have work, on one worker: ``first`` holds it, the others wait;
    at each pass's end the engine that ran asks first for the next (the unfair order)."""
    borrower = object()
    assert cores.try_regular(first, borrower)
    for engine in cost:
        if engine != first:
            assert not cores.try_regular(engine, object())  # waiting from now on
    running, order = (first, borrower), [first]
    for _ in range(passes - 1):
        engine, held = running
        cores.release_regular(engine, held, cost[engine])
        for asking in (engine, *(other for other in cost if other != engine)):
            borrower = object()
            if cores.try_regular(asking, borrower):
                running = (asking, borrower)
                order.append(asking)
                break
    return order


def test_engines_get_equal_time_on_the_workers_whatever_their_passes_cost() -> None:
    """Turns go to the engine that has had the least time: beside 8-second passes, an
    engine of 2-second passes runs four for each of the other's."""
    order = trio.run(_async(_turns, Cores(workers=1), 1, {1: 8.0, 2: 2.0}, 15))
    assert order == [1, 2, 2, 2, 2] * 3


def test_an_engine_back_from_idle_gets_no_credit_for_its_idle_time() -> None:
    """An engine that had nothing to do while another ran 50 s starts level with it: they
    alternate, instead of it taking the next five passes."""

    async def main() -> list[int]:
        cores = Cores(workers=1)
        cores.stop_waiting(2)  # engine 2: nothing to do
        for _ in range(5):
            borrower = object()
            assert cores.try_regular(1, borrower)
            cores.release_regular(1, borrower, 10.0)
        return _turns(cores, 1, {1: 10.0, 2: 10.0}, 6)

    assert trio.run(main) == [1, 2, 1, 2, 1, 2]


def test_an_engine_back_from_idle_owes_nothing_for_its_past() -> None:
    """An engine that ran 100 s, went idle, and comes back beside one that has just
    started is level with it: they alternate, instead of it waiting out 100 s."""

    async def main() -> list[int]:
        cores = Cores(workers=1)
        for _ in range(10):
            borrower = object()
            assert cores.try_regular(2, borrower)
            cores.release_regular(2, borrower, 10.0)
        cores.stop_waiting(2)  # engine 2's queue emptied
        return _turns(cores, 1, {1: 10.0, 2: 10.0}, 6)

    assert trio.run(main) == [1, 2, 1, 2, 1, 2]


def _async(fn: Callable[..., T], *args: object) -> Callable[[], Awaitable[T]]:
    """``fn(*args)`` inside a trio run (the limiter's calls need one)."""

    async def run() -> T:
        return fn(*args)

    return run


def test_the_express_lane_reserve_is_one_for_every_model() -> None:
    """Each model plans its regular passes less the largest express reserve among the
    models (the one lane runs beside any model's passes); a model whose own worst express
    pass outgrows that reserve runs no express passes."""
    workspace = 100_000.0
    small = BatchPolicy(CostModel(10.0, 0.0), workspace)  # 256 tokens: 2,560 bytes
    large = BatchPolicy(CostModel(30.0, 0.0), workspace)  # 7,680 bytes
    reserve = max(policy.cost.predict(1, 256) for policy in (small, large))
    for policy in (small, large):
        regular, express = express_share(policy, 256, reserve)
        assert regular.workspace_bytes == workspace - reserve
        assert express is not None
        assert express.workspace_bytes == reserve
    corrected = BatchPolicy(CostModel(40.0, 0.0), workspace)  # scaled up after a pass
    regular, express = express_share(corrected, 256, reserve)
    assert regular.workspace_bytes == workspace - reserve
    assert express is None
    # alone, a model keeps its own reserve, as before
    regular, express = express_share(small, 256)
    assert regular.workspace_bytes == workspace - 2_560
    assert express is not None


def test_admission_counts_the_other_engines_work(tiny_encoder: Encoder) -> None:
    """A request to an idle model is judged with the other model's queue ahead of it, up
    to as much as its own work (turns alternate pass by pass)."""
    cores = Cores(workers=1)
    lanes = plan_lanes(1, 1, express_tokens=0)
    policy = BatchPolicy(CostModel(1.0, 0.0), 1e9)

    async def main() -> tuple[float, float]:
        busy = Scheduler(tiny_encoder.forward, policy, lanes=lanes, cores=cores)
        idle = Scheduler(tiny_encoder.forward, policy, lanes=lanes, cores=cores)
        for scheduler in (busy, idle):
            scheduler.seed_pace([(1, 64, 0.1), (4, 64, 0.4), (1, 256, 0.5)])
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            nursery.start_soon(busy.submit, [[0, *range(5, 200), 2]] * 50, DENSE)
            await trio.testing.wait_all_tasks_blocked()  # queued at the closed gate
            ahead = idle.expected_wait_s([64])
            nursery.cancel_scope.cancel()
        alone = Scheduler(tiny_encoder.forward, policy, lanes=lanes)
        alone.seed_pace([(1, 64, 0.1), (4, 64, 0.4), (1, 256, 0.5)])
        return ahead, alone.expected_wait_s([64])

    ahead, alone = trio.run(main)
    assert alone > 0
    assert ahead == pytest.approx(2 * alone)  # the other's 50 long texts: capped at its own
