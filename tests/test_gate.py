"""Startup: the gate holds requests during the probe and always opens afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from bge_trio.config import Settings
from bge_trio.memory.budget import Budget
from bge_trio.memory.cost import CostModel, Point
from bge_trio.memory.plan import MemoryPlan
from bge_trio.memory.probe import ProbeProgress, Progress
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource
from bge_trio.scheduler.gate import Gate
from tests.conftest import running_server, wait_ready
from tests.reference import ReferenceM3, assert_dense_answer


class ControllableProbe:
    """A planner that measures nothing until the test lets it finish (or crash)."""

    def __init__(self, crash: bool = False, step: ProbeProgress | None = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.crash = crash
        self.step = step  # reported as the probe's progress before it waits

    def __call__(
        self, encoder: Encoder, settings: Settings, budget: Budget, *, progress: Progress | None
    ) -> MemoryPlan:
        if self.step is not None and progress is not None:
            progress(self.step)
        self.started.set()
        self.release.wait(timeout=60)
        if self.crash:
            raise RuntimeError("probe blew up")
        return MemoryPlan("complete", CostModel(20_000.0, 4.0), budget)

    async def wait_started(self) -> None:
        """Wait (off the event loop) until the server's startup is inside the probe."""
        assert await trio.to_thread.run_sync(self.started.wait, 30)


async def test_health_reports_the_probe_s_progress(tiny_model_dir: Path, settings_for: Any) -> None:
    step = ProbeProgress(2, 5, Point(8, 512, 0), elapsed_s=3.04, remaining_s=7.46)
    probe = ControllableProbe(step=step)
    async with running_server(settings_for(tiny_model_dir), ready=False, planner=probe) as server:
        await probe.wait_started()
        try:
            health = await server.client.get("/health")
        finally:
            probe.release.set()  # a failed assertion must not leave the probe waiting
        assert health.status_code == 503
        assert health.json() == {
            "status": "probing",
            "probe_progress": {"shape": 2, "of": 5, "seconds": 3.0, "estimate_remaining_s": 7.5},
        }
        await wait_ready(server.client)
        assert "probe_progress" not in (await server.client.get("/health")).json()


async def test_request_during_probe_waits_then_succeeds(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    probe = ControllableProbe()
    async with running_server(settings_for(tiny_model_dir), ready=False, planner=probe) as server:
        await probe.wait_started()
        health = await server.client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "probing"}
        answers: list[int] = []

        async def request() -> None:
            r = await server.client.post("/v1/embeddings", json={"input": "waiting at the gate"})
            answers.append(r.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            for _ in range(1000):  # until the request is queued behind the closed gate
                if server.stats().queued_items:
                    break
                await trio.sleep(0.01)
            assert server.stats().queued_items == 1  # it arrived...
            await trio.sleep(0.2)
            assert answers == []  # ...and is held at the gate
            assert server.stats().forwarded_items == 0
            probe.release.set()
        assert answers == [200]
        health = await server.client.get("/health")
        assert health.status_code == 200
        assert health.json()["probe_status"] == "complete"
        assert health.json()["cost_a_bytes_per_token"] == 20_000.0


async def test_crashing_probe_still_opens_the_gate(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    probe = ControllableProbe(crash=True)
    probe.release.set()
    async with running_server(settings_for(tiny_model_dir), planner=probe) as server:
        health = (await server.client.get("/health")).json()
        assert health["status"] == "ok"
        assert health["probe_status"] == "failed"
        assert health["cost_a_bytes_per_token"] == 16384.0
        assert "probe blew up" in health["probe_detail"]
        r = await server.client.post("/v1/embeddings", json={"input": "served anyway"})
        assert_dense_answer(r, reference, ["served anyway"])


async def test_startup_wait_expires_with_503_and_retry_after(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    probe = ControllableProbe()
    settings = settings_for(tiny_model_dir, startup_wait_s=0.2)
    async with running_server(settings, ready=False, planner=probe) as server:
        await probe.wait_started()
        r = await server.client.post("/v1/embeddings", json={"input": "too early"})
        assert r.status_code == 503
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "not_ready"
        probe.release.set()


async def test_the_startup_wait_is_one_wait_from_arrival_through_loading_and_probing(
    tiny_model_dir: Path, settings_for: Any, mock_clock: trio.testing.MockClock
) -> None:
    """A request that waits for the model to load, then at the closed gate, gets its 503
    one startup wait after it arrived, not one wait for each. Time is trio's mock clock:
    it moves only when the test moves it."""
    probe = ControllableProbe()
    loaded = threading.Event()

    def slow_load(source: ModelSource, **kwargs: Any) -> Encoder:
        assert loaded.wait(timeout=30)
        return load_encoder(source, **kwargs)

    wait_s = 1.0
    settings = settings_for(tiny_model_dir, startup_wait_s=wait_s)
    async with running_server(
        settings, ready=False, planner=probe, load_encoder=slow_load
    ) as server:
        elapsed: list[float] = []

        async def request() -> None:
            sent = trio.current_time()
            r = await server.client.post("/v1/embeddings", json={"input": "too early"})
            elapsed.append(trio.current_time() - sent)
            assert r.status_code == 503

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await _until_every_task_waits(lambda: server.engine.statistics().requests_in_flight)
            assert server.engine.statistics().requests_in_flight == 1
            mock_clock.jump(0.6 * wait_s)  # still loading: the request waits in ready()
            loaded.set()
            await probe.wait_started()  # then probing: it waits at the closed gate
            mock_clock.jump(0.4 * wait_s)  # one wait after it arrived
            await _until_every_task_waits(lambda: elapsed)
            if not elapsed:  # still waiting: let a second wait pass, and fail below
                mock_clock.jump(wait_s)
        probe.release.set()
        mock_clock.autojump_threshold = 0  # the server's shutdown runs on this clock too
    assert elapsed == [wait_s]


async def _until_every_task_waits(done: Callable[[], object]) -> None:
    """Until ``done()`` holds and every task waits (on I/O, a thread or the clock), or 10
    s of real time pass (the mock clock stands still)."""
    give_up = time.monotonic() + 10
    while not done() and time.monotonic() < give_up:
        await trio.testing.wait_all_tasks_blocked()
        await trio.to_thread.run_sync(lambda: None)  # let the other threads run


async def test_memory_too_small_fails_startup_clearly(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    settings = settings_for(tiny_model_dir, memory_limit_bytes=1 << 20, memory_headroom_bytes=0)
    async with running_server(settings, ready=False) as server:
        with trio.fail_after(30):
            await server.engine.failed.wait()
        health = await server.client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert "BGE_TRIO_MAX_SEQ_LENGTH" in health.json()["error"]
        r = await server.client.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "server_failed"
        assert "BGE_TRIO" not in r.text  # details stay in the log


async def test_the_gate_lifts_its_wait_deadline_when_it_opens() -> None:
    """Work let through before the startup wait ran out is not cut off by it later."""
    gate = Gate(1)
    with gate.until(trio.current_time() + 0.2) as waited:
        await trio.sleep(0.1)
        gate.open()
        await trio.sleep(0.3)  # past the deadline the gate set
    assert not waited.cancelled_caught


async def test_a_gate_still_closed_at_the_deadline_gives_up() -> None:
    gate = Gate(1)
    start = trio.current_time()
    with gate.until(start + 0.2) as waited:
        await trio.sleep(10)
    assert waited.cancelled_caught
    assert trio.current_time() - start < 1
    with gate.until(trio.current_time() - 1) as late:  # already past
        await trio.lowlevel.checkpoint()
    assert late.cancelled_caught
    gate.open()
    with gate.until(trio.current_time() - 1) as opened:  # an open gate bounds nothing
        await trio.lowlevel.checkpoint()
    assert not opened.cancelled_caught
