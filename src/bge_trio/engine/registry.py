"""The engines one process serves, found by the model a request names.

``BGE_TRIO_MODEL`` names one model or several (an embedder and a cross-encoder, say);
each is an :class:`~bge_trio.engine.Engine` with its own probe, cost model, probe-cache
entry and scheduler. A request names its model in ``model``, as OpenAI's and Cohere's
clients send it. With one engine every request is its (any ``model`` string is accepted,
as before); with several, a name that is none of theirs is a 400 naming the models
served, and a route a model cannot serve (embeddings from a cross-encoder, say) is a 400
naming the models that can. A request that names no model goes to the first model of
the kind its route needs.

The engines start in one :class:`~bge_trio.engine.startup.StartupOrder` and share the
process's cores and memory (:mod:`bge_trio.scheduler.cores`): at most ``workers``
regular passes run at once in the whole process, so every pass of every model may use
one worker's share of what the limit leaves after the resident size (every model
loaded) and the headroom, less the one express lane's reserve.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from bge_trio.cgroups import detect_cpu_limit
from bge_trio.config import ConfigError, Settings
from bge_trio.engine.backend import express_tokens
from bge_trio.engine.engine import Engine
from bge_trio.engine.prepare import LoadEncoder
from bge_trio.engine.startup import StartupOrder
from bge_trio.errors import invalid
from bge_trio.memory.plan import Planner, plan_memory
from bge_trio.model.loading import load_encoder, model_kind
from bge_trio.model.source import ModelSource, resolve_model
from bge_trio.model.transformer import Kind
from bge_trio.scheduler.lanes import plan_lanes

# what each kind of model serves, for the 400 that names the models that can
SERVES: dict[Kind, str] = {"embedding": "embeddings", "reranker": "cross-encoder reranking"}


class Engines:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("no engine to serve")
        self._engines = list(engines)
        self._by_name = {engine.name: engine for engine in engines}
        if len(self._by_name) < len(self._engines):
            raise ConfigError(
                "two served models have the same name; name them in BGE_TRIO_MODEL as "
                "name=path,name=path"
            )
        self.default = engines[0]

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def of_kind(self, kind: Kind) -> list[Engine]:
        return [engine for engine in self._engines if engine.kind == kind]

    def find(self, model: str | None, kind: Kind | None = None) -> Engine:
        """The engine serving ``model`` (the only one, whatever the name, when there is
        one), or when the request names none, the first of ``kind``. A model that is not
        of ``kind`` is a 400 naming the models that are."""
        if model is None or len(self._engines) == 1:
            of_kind = [] if kind is None else self.of_kind(kind)
            return self._check_kind(of_kind[0] if of_kind else self.default, kind)
        engine = self._by_name.get(model)
        if engine is None:
            raise invalid(
                f"model {model!r} is not served here; served: {', '.join(self._by_name)}",
                param="model",
                code="model_not_found",
            )
        return self._check_kind(engine, kind)

    def _check_kind(self, engine: Engine, kind: Kind | None) -> Engine:
        if kind is None or engine.kind == kind:
            return engine
        able = [other.name for other in self.of_kind(kind)]
        can = f"models that can: {', '.join(able)}" if able else "no model served here can"
        raise invalid(
            f"model {engine.name!r} is a {engine.kind} model; it cannot serve "
            f"{SERVES[kind]} ({can})",
            param="model",
            code="model_not_supported",
        )

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


def serving_engines(
    settings: Settings,
    sources: Sequence[ModelSource] | None = None,
    *,
    root: Path = Path("/"),
    planner: Planner = plan_memory,
    load: LoadEncoder = load_encoder,
) -> Engines:
    """The engines of a process: one per model of ``BGE_TRIO_MODEL`` (``sources``: the
    models already resolved, in that order), sharing the cores and the memory."""
    entries = settings.models()
    found = list(sources) if sources is not None else [resolve_model(e.spec) for e in entries]
    if len(found) != len(entries):
        raise ConfigError(f"{len(entries)} models configured, {len(found)} given")
    cpu = detect_cpu_limit(root)
    lanes = plan_lanes(cpu.threads, settings.workers, express_tokens(settings))
    order = StartupOrder(engines=len(entries), forwards=lanes.workers)
    engines = []
    for entry, source in zip(entries, found, strict=True):
        kind = model_kind(source.path)
        own = settings.for_model(entry, reranker=kind == "reranker")
        engines.append(
            Engine(
                own,
                source,
                lanes,
                cpu,
                root=root,
                planner=planner,
                load=load,
                order=order,
                kind=kind,
            )
        )
    return Engines(engines)
