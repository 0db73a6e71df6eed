"""The engines one process serves, found by the model a request names.

A request names its model in ``model``, as OpenAI's and Cohere's clients send it. With
one engine every request is its (any ``model`` string is accepted, as before); with
several, a name that is none of theirs is a 400 naming the models served. The engines
start in one :class:`~bge_trio.engine.startup.StartupOrder` and share the process's
memory limit: every regular worker of every engine gets an equal share of what the limit
leaves after the resident size (every model loaded) and the headroom.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from bge_trio.cgroups import detect_cpu_limit
from bge_trio.config import Settings
from bge_trio.engine.engine import Engine
from bge_trio.engine.prepare import LoadEncoder
from bge_trio.engine.startup import StartupOrder
from bge_trio.errors import invalid
from bge_trio.memory.plan import Planner, plan_memory
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource
from bge_trio.scheduler.lanes import plan_lanes


class Engines:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("no engine to serve")
        self._engines = list(engines)
        self._by_name = {engine.name: engine for engine in engines}
        self.default = engines[0]

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def find(self, model: str | None) -> Engine:
        """The engine serving ``model`` (the only one, whatever the name, when there is
        one; the default when the request names none)."""
        if model is None or len(self._engines) == 1:
            return self.default
        engine = self._by_name.get(model)
        if engine is None:
            raise invalid(
                f"model {model!r} is not served here; served: {', '.join(self._by_name)}",
                param="model",
                code="model_not_found",
            )
        return engine

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every engine until cancelled."""
        async with trio.open_nursery() as nursery:
            for engine in self._engines:
                await nursery.start(engine.run)
            task_status.started()

    async def failed(self) -> None:
        """Return once any engine has failed for good."""
        async with trio.open_nursery() as nursery:

            async def watch(engine: Engine) -> None:
                await engine.failed.wait()
                nursery.cancel_scope.cancel()

            for engine in self._engines:
                nursery.start_soon(watch, engine)

    def begin_shutdown(self, window_s: float) -> None:
        for engine in self._engines:
            engine.begin_shutdown(window_s)


def one_engine(
    settings: Settings,
    source: ModelSource,
    *,
    root: Path = Path("/"),
    planner: Planner = plan_memory,
    load: LoadEncoder = load_encoder,
) -> Engines:
    """The engines of a process that serves one model (``BGE_TRIO_MODEL``)."""
    cpu = detect_cpu_limit(root)
    lanes = plan_lanes(cpu.threads, settings.workers, settings.express_tokens)
    order = StartupOrder(engines=1, forwards=lanes.workers)
    engine = Engine(
        settings, source, lanes, cpu, root=root, planner=planner, load=load, order=order
    )
    return Engines([engine])
