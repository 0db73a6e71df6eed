"""The scheduler: memory-safe batches, every text answered once and in order, cancellation."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from bge_trio.errors import BatchFailed
from bge_trio.memory.cost import CostModel
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import DENSE, BetweenLayers, Embedding, Encoder, Output
from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.lanes import plan_lanes
from bge_trio.scheduler.scheduler import Runner, Scheduler


class RecordingModel:
    """The real tiny model, remembering every batch it was given."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.batches: list[list[tuple[int, ...]]] = []

    def __call__(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None = None,
        express: bool = False,
    ) -> list[Embedding]:
        self.batches.append([tuple(ids) for ids in batch])
        return self.encoder.forward(batch, outputs, between_layers, express)

    @property
    def seen(self) -> Counter[tuple[int, ...]]:
        return Counter(ids for batch in self.batches for ids in batch)


def _text(rng: np.random.Generator, length: int) -> list[int]:
    # <s> ... </s> with ordinary token ids of the tiny model in between
    return [0, *rng.integers(5, 100, size=max(0, length - 2)).tolist(), 2][:length]


def _scheduler(
    runner: Runner, *, workers: int = 1, opened: bool = False, **kwargs: Any
) -> Scheduler:
    """A scheduler of ``workers`` regular workers and no express lane (its gate closed
    unless ``opened``)."""
    lanes = plan_lanes(workers, workers, express_tokens=0)
    scheduler = Scheduler(runner, lanes=lanes, **kwargs)
    if opened:
        scheduler.open()
    return scheduler


def token_policy(tokens: int) -> BatchPolicy:
    """A budget of exactly ``tokens`` padded tokens per batch (a = 1 byte, b = 0)."""
    return BatchPolicy(CostModel(1.0, 0.0), float(tokens))


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(2, 48), min_size=1, max_size=6), min_size=1, max_size=6),
    budget=st.integers(48, 300),
    workers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_batches_fit_and_every_text_is_answered_once_in_order(
    tiny_encoder: Encoder, lengths: list[list[int]], budget: int, workers: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    requests = [[_text(rng, n) for n in request] for request in lengths]
    model = RecordingModel(tiny_encoder)
    policy = token_policy(budget)
    results: dict[int, list[Embedding]] = {}

    async def main() -> None:
        scheduler = _scheduler(model, workers=workers, policy=policy, batch_wait_s=0.001)
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            scheduler.open()
            async with trio.open_nursery() as clients:
                for i, request in enumerate(requests):

                    async def one(i: int = i, request: list[list[int]] = request) -> None:
                        results[i] = (await scheduler.submit(request, DENSE)).results

                    clients.start_soon(one)
            nursery.cancel_scope.cancel()

    trio.run(main)
    for batch in model.batches:
        assert policy.fits(len(batch), max(len(ids) for ids in batch))
    submitted = Counter(tuple(ids) for request in requests for ids in request)
    assert model.seen == submitted  # exactly once each
    for i, request in enumerate(requests):
        expected = tiny_encoder.forward(request, DENSE)
        assert len(results[i]) == len(request)
        for got, want in zip(results[i], expected, strict=True):
            np.testing.assert_allclose(got.dense, want.dense, atol=1e-5)  # type: ignore[arg-type]


async def test_cancelled_requests_never_reach_the_model(tiny_encoder: Encoder) -> None:
    model = RecordingModel(tiny_encoder)
    scheduler = _scheduler(model, workers=1, policy=token_policy(10_000), batch_wait_s=0.0)
    abandoned = [[0, 77, 77, 77, 2], [0, 78, 78, 2]]
    kept = [[0, 5, 6, 2]]
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        with trio.move_on_after(0.2):  # a deadline passes while the gate is closed
            await scheduler.submit(abandoned, DENSE)
        results: list[Embedding] = []
        answered = trio.Event()

        async def survivor() -> None:
            results.extend((await scheduler.submit(kept, DENSE)).results)
            answered.set()

        nursery.start_soon(survivor)
        await trio.testing.wait_all_tasks_blocked()  # it waits behind the closed gate
        scheduler.open()
        with trio.fail_after(10):
            await answered.wait()
        nursery.cancel_scope.cancel()
    assert model.seen == Counter({tuple(kept[0]): 1})
    assert scheduler.statistics().forwarded_items == 1


async def test_concurrent_requests_share_batches(tiny_encoder: Encoder) -> None:
    model = RecordingModel(tiny_encoder)
    scheduler = _scheduler(model, workers=1, policy=token_policy(10_000), batch_wait_s=0.0)
    requests = [[[0, 10 + r, 20 + i, 2] for i in range(2)] for r in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        async with trio.open_nursery() as clients:
            for request in requests:
                clients.start_soon(scheduler.submit, request, DENSE)
            await trio.testing.wait_all_tasks_blocked()
            assert scheduler.statistics().queued_items == 6  # all behind the closed gate
            scheduler.open()
        nursery.cancel_scope.cancel()
    assert len(model.batches) == 1
    assert len(model.batches[0]) == 6


async def test_a_failing_batch_fails_only_its_requests(tiny_encoder: Encoder) -> None:
    poison = (0, 99, 99, 2)

    def flaky(
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        _: BetweenLayers | None = None,
        express: bool = False,
    ) -> list[Embedding]:
        if any(tuple(ids) == poison for ids in batch):
            raise RuntimeError("bad batch")
        return tiny_encoder.forward(batch, outputs)

    scheduler = _scheduler(
        flaky, workers=1, opened=True, policy=token_policy(10_000), batch_wait_s=0.0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        with pytest.raises(BatchFailed, match="forward pass failed"):
            await scheduler.submit([list(poison)], DENSE)
        ok = await scheduler.submit([[0, 5, 2]], DENSE)
        assert len(ok.results) == 1
        nursery.cancel_scope.cancel()


@given(
    lengths=st.lists(st.integers(1, 512), min_size=1, max_size=60),
    budget=st.integers(1, 20_000),
    cap=st.one_of(st.none(), st.integers(8, 4096)),
)
def test_plan_includes_the_oldest_and_fits(
    lengths: list[int], budget: int, cap: int | None
) -> None:
    policy = BatchPolicy(CostModel(1.0, 0.01), float(budget), max_batch_tokens=cap)
    chosen = plan_batch(lengths, policy)
    assert 0 in chosen
    assert len(set(chosen)) == len(chosen)
    assert all(0 <= i < len(lengths) for i in chosen)
    width = max(lengths[i] for i in chosen)
    if len(chosen) > 1:
        assert policy.fits(len(chosen), width)
    # maximal: with passes this expensive, no text left out would still have fitted
    for j in set(range(len(lengths))) - set(chosen):
        assert not policy.fits(len(chosen) + 1, max(width, lengths[j]))


async def test_a_batch_does_not_wait_when_nobody_is_coming(tiny_encoder: Encoder) -> None:
    scheduler = _scheduler(
        RecordingModel(tiny_encoder),
        workers=1,
        opened=True,
        policy=token_policy(10_000),
        batch_wait_s=30,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        with trio.fail_after(10):  # far less than the 30 s batch wait
            await scheduler.submit([[0, 5, 6, 2]], DENSE)
        nursery.cancel_scope.cancel()


async def test_a_batch_waits_for_requests_still_being_tokenised(tiny_encoder: Encoder) -> None:
    model = RecordingModel(tiny_encoder)
    scheduler = _scheduler(
        model, workers=1, opened=True, policy=token_policy(10_000), batch_wait_s=30
    )
    first, second = [[0, 5, 6, 2]], [[0, 7, 8, 2]]
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        async with trio.open_nursery() as clients:

            async def late() -> None:
                with scheduler.arriving():
                    await trio.sleep(0.2)  # "tokenising" while the first text queues
                await scheduler.submit(second, DENSE)

            clients.start_soon(late)
            await trio.testing.wait_all_tasks_blocked()  # it is "tokenising"
            with trio.fail_after(10):
                await scheduler.submit(first, DENSE)
        nursery.cancel_scope.cancel()
    assert model.batches == [[tuple(first[0]), tuple(second[0])]]


async def test_short_texts_do_not_ride_padded_with_a_long_one(tiny_encoder: Encoder) -> None:
    model = RecordingModel(tiny_encoder)
    scheduler = _scheduler(model, workers=1, policy=token_policy(10_000), batch_wait_s=0.0)
    rng = np.random.default_rng(0)
    long, short = [_text(rng, 200)], [_text(rng, n) for n in (5, 6, 7)]
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        async with trio.open_nursery() as clients:
            clients.start_soon(scheduler.submit, long, DENSE)
            await trio.testing.wait_all_tasks_blocked()
            clients.start_soon(scheduler.submit, short, DENSE)
            await trio.testing.wait_all_tasks_blocked()
            assert scheduler.statistics().queued_items == 4  # behind the closed gate
            scheduler.open()
        nursery.cancel_scope.cancel()
    # the budget would fit all four in one pass; the padding would cost ~580 tokens
    assert [len(batch) for batch in model.batches] == [1, 3]
    assert model.batches[0] == [tuple(long[0])]


async def test_a_request_s_texts_reach_one_pass_together(tiny_encoder: Encoder) -> None:
    model = RecordingModel(tiny_encoder)
    scheduler = _scheduler(
        model, workers=1, opened=True, policy=token_policy(10_000), batch_wait_s=0.0
    )
    rng = np.random.default_rng(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await scheduler.submit([_text(rng, 32) for _ in range(12)], DENSE)
        nursery.cancel_scope.cancel()
    assert [len(batch) for batch in model.batches] == [12]


async def test_only_a_pass_that_ran_alone_is_measured(tiny_encoder: Encoder) -> None:
    model = SlowModel(tiny_encoder)
    scheduler = _scheduler(
        model,
        workers=2,
        opened=True,
        policy=token_policy(10_000),
        batch_wait_s=0.0,
        meter=PeakMeter("vmhwm"),
    )
    rng = np.random.default_rng(4)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await scheduler.submit([_text(rng, 8)], DENSE)  # alone: measured
        measured = scheduler.statistics().last_measured
        assert measured is not None
        assert (measured.batch, measured.seq) == (1, 8)
        assert measured.bytes > 0
        async with trio.open_nursery() as clients:
            # a long pass on one worker, and a short one inside it on the other
            clients.start_soon(scheduler.submit, [_text(rng, 48)], DENSE)
            await trio.to_thread.run_sync(model.long_pass_started.wait)
            clients.start_soon(scheduler.submit, [_text(rng, 16)], DENSE)
        nursery.cancel_scope.cancel()
    assert len(model.batches) == 3
    # neither overlapping pass was measured
    assert scheduler.statistics().passes_measured == 1
    assert scheduler.statistics().last_measured == measured


class SlowModel(RecordingModel):
    """The real tiny model, taking 10 ms per token, so that passes overlap as planned."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__(encoder)
        self.long_pass_started = threading.Event()

    def __call__(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None = None,
        express: bool = False,
    ) -> list[Embedding]:
        self.batches.append([tuple(ids) for ids in batch])
        longest = max(len(ids) for ids in batch)
        if longest >= 40:
            self.long_pass_started.set()
        time.sleep(0.01 * longest)
        return self.encoder.forward(batch, outputs, between_layers, express)
