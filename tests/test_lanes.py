"""Short texts beside long ones: the express lane, threads by the moment, passes that stop.

The tiny model runs for real; a long pass is made long by pausing before each of its
encoder layers (inside the encoder's own between-layer hook), so the order of events
is certain without timing anything.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from bge_trio.errors import Overloaded, TooSlow
from bge_trio.memory.cost import CostModel
from bge_trio.model.encoder import (
    DENSE,
    BetweenLayers,
    Embedding,
    Encoder,
    Output,
    PassAbandoned,
)
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.lanes import plan_lanes
from bge_trio.scheduler.scheduler import Scheduler
from tests.conftest import running_server
from tests.reference import ReferenceM3

LONG, SHORT = 40, 6
POLICY = BatchPolicy(CostModel(1.0, 0.0), 10_000.0)


class LayeredModel:
    """The real tiny model; a long pass waits for a step before each layer, and short
    passes wait before their first layer while ``hold_short`` is set."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.long_started = threading.Event()
        self.steps = threading.Semaphore(0)  # one per layer a long pass may enter
        self.hold_short = threading.Event()
        self.short_started = threading.Event()
        self.short_release = threading.Event()
        self.stopped = threading.Event()  # a pass was stopped between layers
        self.regular_chose_threads = threading.Event()
        self.layers_run: list[int] = []  # layers entered, per long pass
        self.threads_seen: list[tuple[str, int]] = []  # (thread name, threads asked)

    def __call__(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None = None,
        express: bool = False,
    ) -> list[Embedding]:
        long = max(len(ids) for ids in batch) >= LONG
        if long:
            self.layers_run.append(0)

        def slow_between() -> None:
            if between_layers is not None:
                try:
                    between_layers()  # may stop the pass, or change its threads
                except PassAbandoned:
                    self.stopped.set()
                    raise
            if long:
                self.layers_run[-1] += 1
                self.long_started.set()
                assert self.steps.acquire(timeout=30)
            elif self.hold_short.is_set():
                self.short_started.set()
                self.short_release.wait(timeout=30)

        return self.encoder.forward(batch, outputs, slow_between)

    def let_go(self) -> None:
        self.steps.release(1000)

    def record_threads(self, threads: int) -> None:
        name = threading.current_thread().name
        self.threads_seen.append((name, threads))
        if name == "bge-trio-forward-0":
            self.regular_chose_threads.set()


def _text(length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [0, *rng.integers(5, 100, size=length - 2).tolist(), 2]


def _scheduler(
    model: LayeredModel, express_tokens: int = 16, policy: BatchPolicy = POLICY, **kwargs: float
) -> Scheduler:
    scheduler = Scheduler(
        model,
        policy,
        lanes=plan_lanes(2, None, express_tokens=express_tokens),
        batch_wait_s=0.0,
        threads=model.record_threads,
        **kwargs,  # type: ignore[arg-type]
    )
    scheduler.open()
    return scheduler


async def test_short_texts_overtake_a_long_pass_on_the_express_lane(
    tiny_encoder: Encoder,
) -> None:
    model = LayeredModel(tiny_encoder)
    scheduler = _scheduler(model)
    long_done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)

        async def long_request() -> None:
            await scheduler.submit([_text(LONG)], DENSE)
            long_done.set()

        nursery.start_soon(long_request)
        await trio.to_thread.run_sync(model.long_started.wait)
        for seed in range(3):  # one after another, all while the long pass is held
            (result,) = (await scheduler.submit([_text(SHORT, seed)], DENSE)).results
            assert result.dense is not None
        assert not long_done.is_set()
        model.let_go()
        await long_done.wait()
        nursery.cancel_scope.cancel()
    assert scheduler.statistics().express_passes == 3


async def test_a_long_pass_gives_up_a_core_at_its_next_layer_while_express_runs(
    tiny_encoder: Encoder,
) -> None:
    model = LayeredModel(tiny_encoder)
    scheduler = _scheduler(model)
    _seed_quick(scheduler)  # a pass known to be short starts with every core
    regular = "bge-trio-forward-0"
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        nursery.start_soon(scheduler.submit, [_text(LONG)], DENSE)
        await trio.to_thread.run_sync(model.long_started.wait)  # inside layer 1, 2 threads
        assert model.threads_seen[-1] == (regular, 2)
        model.hold_short.set()
        nursery.start_soon(scheduler.submit, [_text(SHORT)], DENSE)
        await trio.to_thread.run_sync(model.short_started.wait)  # the express pass runs
        seen = len(model.threads_seen)
        model.regular_chose_threads.clear()
        model.steps.release()  # the long pass reaches layer 2 meanwhile
        await trio.to_thread.run_sync(model.regular_chose_threads.wait)
        assert (regular, 1) in model.threads_seen[seen:]  # one core left to the express lane
        assert ("bge-trio-express", 1) in model.threads_seen
        model.short_release.set()
        model.let_go()
        nursery.cancel_scope.cancel()


def _seed_quick(scheduler: Scheduler) -> None:
    scheduler.seed_pace((b, s, 0.001 + b * s * 1e-5) for b, s in [(1, 40), (4, 100), (1, 8)] * 4)


async def test_a_pass_predicted_long_starts_on_shared_threads_then_takes_every_core(
    tiny_encoder: Encoder,
) -> None:
    model = LayeredModel(tiny_encoder)
    scheduler = _scheduler(model)  # nothing learnt yet: a long text may take minutes
    regular = "bge-trio-forward-0"
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        nursery.start_soon(scheduler.submit, [_text(LONG)], DENSE)
        await trio.to_thread.run_sync(model.long_started.wait)
        assert model.threads_seen[-1] == (regular, 1)  # a query arriving now finds a core
        model.regular_chose_threads.clear()
        model.steps.release()
        await trio.to_thread.run_sync(model.regular_chose_threads.wait)
        assert model.threads_seen[-1] == (regular, 2)  # the express lane is quiet
        model.let_go()
        nursery.cancel_scope.cancel()


async def test_long_texts_never_take_the_express_lane(tiny_encoder: Encoder) -> None:
    model = LayeredModel(tiny_encoder)
    scheduler = _scheduler(model)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        nursery.start_soon(scheduler.submit, [_text(LONG)], DENSE)
        await trio.to_thread.run_sync(model.long_started.wait)
        with trio.move_on_after(0.5):  # a second long text waits for the regular worker
            await scheduler.submit([_text(LONG, 1)], DENSE)
        assert scheduler.statistics().express_passes == 0
        model.let_go()
        nursery.cancel_scope.cancel()


async def test_a_pass_nobody_waits_for_stops_at_the_next_layer(tiny_encoder: Encoder) -> None:
    model = LayeredModel(tiny_encoder)
    scheduler = _scheduler(model)
    layers = tiny_encoder.layers
    assert layers >= 2
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        with trio.CancelScope() as request:  # the client goes away mid-pass

            async def give_up() -> None:
                await trio.to_thread.run_sync(model.long_started.wait)
                request.cancel()

            nursery.start_soon(give_up)
            await scheduler.submit([_text(LONG)], DENSE)
        # only now, with the request's cancellation recorded, may the pass go on: let go
        # earlier and it can finish its layers before anyone sees that nobody waits
        model.let_go()
        assert await trio.to_thread.run_sync(model.stopped.wait, 30)
        assert model.layers_run == [1]  # the first layer was under way; no other ran
        (after,) = (await scheduler.submit([_text(LONG, 2)], DENSE)).results  # the worker is free
        assert after.dense is not None
        assert scheduler.statistics().passes_stopped_early == 1
        assert scheduler.statistics().consecutive_failures == 0  # not a failure
        nursery.cancel_scope.cancel()
    assert model.layers_run == [1, layers]


async def test_a_text_that_cannot_finish_in_time_is_refused_before_it_runs(
    tiny_encoder: Encoder,
) -> None:
    model = LayeredModel(tiny_encoder)
    model.let_go()
    scheduler = _scheduler(model, max_wait_s=2.0)
    # the pace says 1 ms per token plus attention: 40 tokens ~0.05 s, 1,500 ~ 3.8 s
    scheduler.seed_pace(
        (b, s, 0.01 + b * s * (0.001 + 1e-6 * s)) for b, s in [(1, 40), (4, 100), (1, 800)] * 4
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        with pytest.raises(TooSlow) as refused:
            await scheduler.submit([_text(SHORT), _text(1500)], DENSE)
        assert refused.value.index == 1
        assert refused.value.estimate_s == pytest.approx(0.01 + 1500 * (0.001 + 1.5e-3), rel=0.01)
        assert model.layers_run == []  # nothing of it ran
        assert scheduler.statistics().queued_items == 0
        await scheduler.submit([_text(LONG)], DENSE)  # one that fits goes through
        nursery.cancel_scope.cancel()


async def test_a_short_query_is_not_refused_for_the_long_work_queued(
    tiny_encoder: Encoder,
) -> None:
    model = LayeredModel(tiny_encoder)
    # passes of at most 801 tokens, 0.5 s each and more per token: the two queued texts
    # fill one pass, and a short text on the regular lane would need a pass of its own
    policy = BatchPolicy(CostModel(1.0, 0.0), 10_000.0, max_batch_tokens=801)
    scheduler = _scheduler(model, policy=policy, max_wait_s=3.9)  # admits up to 2.925 s
    scheduler.seed_pace(
        (b, s, 0.5 + b * s * (0.001 + 1e-6 * s)) for b, s in [(1, 40), (4, 100), (1, 800)] * 4
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        nursery.start_soon(scheduler.submit, [_text(400)], DENSE)  # runs ~1.06 s
        await trio.to_thread.run_sync(model.long_started.wait)
        for seed in range(1, 3):  # expected to end 2.1 and 2.7 s from now: admitted
            nursery.start_soon(scheduler.submit, [_text(400, seed)], DENSE)
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.statistics().queued_items == 2
        # the running pass, two queued and itself: 3.7 s, past 75 % of the deadline
        with pytest.raises(Overloaded) as full:
            await scheduler.submit([_text(400, 9)], DENSE)
        assert full.value.retry_after_s >= 1
        # behind the long work a short text would end 3.2 s from now, past 75 % too; on
        # the express lane it waits for no long pass and is admitted
        (short,) = (await scheduler.submit([_text(SHORT)], DENSE)).results
        assert short.dense is not None
        model.let_go()
        nursery.cancel_scope.cancel()


def test_the_express_lane_shuts_where_its_memory_would_crowd_regular_passes() -> None:
    lanes = plan_lanes(2, None, express_tokens=256)
    roomy = Scheduler(lambda *_: [], BatchPolicy(CostModel(10.0, 0.0), 1e6), lanes=lanes)
    assert roomy.express_policy is not None
    assert roomy.express_policy.workspace_bytes == 2560
    assert roomy.policy.workspace_bytes == 1e6 - 2560  # set aside from regular passes
    tight = Scheduler(lambda *_: [], BatchPolicy(CostModel(10.0, 0.0), 20_000), lanes=lanes)
    assert tight.express_policy is None
    assert tight.policy.workspace_bytes == 20_000


@pytest.mark.parametrize(
    ("cpu", "workers", "expected"),
    [
        (2, None, (1, 2, 1, 1)),  # auto: one pass with both cores, express beside it
        (8, None, (1, 8, 4, 4)),
        (2, 2, (2, 1, 1, 1)),
        (1, None, (1, 1, 1, 1)),
    ],
)
def test_lanes_divide_the_cores(cpu: int, workers: int | None, expected: tuple[int, ...]) -> None:
    lanes = plan_lanes(cpu, workers)
    assert (lanes.workers, lanes.threads, lanes.shared_threads, lanes.express_threads) == expected


async def test_the_server_refuses_a_text_it_cannot_finish_in_time_with_the_estimate(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    settings = settings_for(tiny_model_dir, request_timeout_s=2.0)
    async with running_server(settings) as server:
        # as the probe's timed passes (or earlier traffic) would have taught it
        server.scheduler.seed_pace(
            (b, s, 0.01 + b * s * (0.001 + 1e-5 * s)) for b, s in [(1, 40), (4, 100), (1, 400)] * 4
        )
        text = " ".join(["word"] * 300)
        tokens = min(512, len(reference.ids(text)))
        r = await server.client.post("/v1/embeddings", json={"input": ["hi", text]})
        ok = await server.client.post("/v1/embeddings", json={"input": ["hi"]})
        health = (await server.client.get("/health")).json()
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "input_too_slow_for_deadline"
    assert error["param"] == "input"
    assert "input[1]" in error["message"]
    assert f"input[1] has {tokens} tokens" in error["message"]
    estimate = 0.01 + tokens * (0.001 + 1e-5 * tokens)
    assert estimate > 2.0
    assert f"about {estimate:.0f} s, more than the request deadline of 2 s" in error["message"]
    assert "BGE_TRIO_REQUEST_TIMEOUT_S" in error["message"]
    assert ok.status_code == 200
    assert health["queued_items"] == 0
