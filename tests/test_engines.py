"""Engines: one per served model; two in one process start in order and share the budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import attrs
import pytest
import trio

from bge_trio.config import ConfigError, Settings
from bge_trio.engine import EmbedRequest, Engines, serving_engines
from bge_trio.engine.state import Loading, Ready
from bge_trio.errors import InvalidRequest
from bge_trio.memory.budget import Budget
from bge_trio.memory.plan import MemoryPlan, plan_memory
from bge_trio.memory.probe import Progress
from bge_trio.model.encoder import DENSE, Encoder
from tests.conftest import SettingsFactory


class RecordingPlanner:
    """The real planner, recording when each engine's planning ran (and its budget)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.budgets: list[Budget] = []
        self._lock = threading.Lock()

    def __call__(
        self, encoder: Encoder, settings: Settings, budget: Budget, *, progress: Progress | None
    ) -> MemoryPlan:
        started = time.monotonic()
        plan = plan_memory(encoder, settings, budget, progress=progress)
        time.sleep(0.2)  # long enough that two plannings at once would overlap
        with self._lock:
            self.spans.append((started, time.monotonic()))
            self.budgets.append(budget)
        return plan


def _engines(
    tiny_model_dir: Path, settings_for: SettingsFactory, planner: RecordingPlanner
) -> Engines:
    settings = settings_for(f"first={tiny_model_dir},second={tiny_model_dir}", workers=1)
    return serving_engines(settings, planner=planner)


async def test_two_engines_probe_one_at_a_time_and_open_together(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    planner = RecordingPlanner()
    engines = _engines(tiny_model_dir, settings_for, planner)
    first = engines.default
    async with trio.open_nursery() as nursery:
        await nursery.start(engines.run)
        assert isinstance(first.state, Loading)
        with trio.fail_after(60):
            info = await first.loaded(trio.current_time() + 60)
        assert info.name == "first"
        # every engine's requests are served by its own model and scheduler
        request = EmbedRequest(["a cat"], None, DENSE)
        for engine in engines:
            embedded = await engine.embed(request, trio.current_time() + 60)
            assert embedded.embeddings[0].dense is not None
        assert all(isinstance(engine.state, Ready) for engine in engines)
        nursery.cancel_scope.cancel()
    (_, first_end), (second_start, _) = sorted(planner.spans)
    assert first_end <= second_start  # one probe at a time: the high-water mark is per process
    # both planned with one worker's share: the engines take turns on the one worker
    # (no more passes at once than with one model), so they do not split the memory
    assert [budget.concurrent_forwards for budget in planner.budgets] == [1, 1]


async def test_no_gate_opens_before_every_engine_has_planned(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    planner = RecordingPlanner()
    engines = _engines(tiny_model_dir, settings_for, planner)
    first, second = engines
    opened_while_planning: list[bool] = []

    async def watch() -> None:
        while not isinstance(second.state, Ready):
            stats = first.statistics().scheduler
            if stats is not None and stats.gate_open:
                opened_while_planning.append(len(planner.spans) < 2)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(engines.run)
        with trio.fail_after(60):
            await watch()
        nursery.cancel_scope.cancel()
    assert True not in opened_while_planning


def test_a_request_finds_its_engine_by_model(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    engines = _engines(tiny_model_dir, settings_for, RecordingPlanner())
    first, second = engines
    assert engines.find("second") is second
    assert engines.find(None) is first  # the default
    with pytest.raises(InvalidRequest) as unknown:
        engines.find("other")
    assert unknown.value.code == "model_not_found"
    assert "served: first, second" in unknown.value.message
    one = Engines([first])
    assert one.find("anything at all") is first  # one model: every request is its


def test_every_forward_pass_of_every_engine_gets_an_equal_share() -> None:
    """The stated rule: what the limit leaves after the resident size (every model) and
    the headroom, times the safety factor, split equally over every forward pass."""
    from bge_trio.memory.budget import MemoryLimit

    limit = MemoryLimit(8 << 30, "env")
    alone = Budget(limit, 2 << 30, 256 << 20, 0.7, workers=1, processes=1)
    shared = attrs.evolve(alone, workers=3)  # one worker here, two in another engine
    free = (8 << 30) - (2 << 30) - (256 << 20)
    assert alone.workspace_bytes == int(free * 0.7)
    assert shared.workspace_bytes == int(free * 0.7 / 3)


def test_two_models_served_by_one_name_are_refused(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    with pytest.raises(ConfigError, match="same name"):
        serving_engines(settings_for(f"{tiny_model_dir},{tiny_model_dir}"))
