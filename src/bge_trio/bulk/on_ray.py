"""``bge-trio embed --ray``: the same job, its shards spread over Ray actors.

The driver is the local job's (:func:`~bge_trio.bulk.job.run_job`): it reads the rows,
cuts them into shards, skips the shards the manifest names and records each part once it
is written, so a job killed as a whole (the driver, the head node) and run again with
the same arguments resumes where it stopped, exactly as on one machine. What differs is
the runner: one :class:`EmbedActor` per worker, each holding a model (a
:class:`~bge_trio.bulk.embedder.BulkEmbedder`, sized from the container or node it runs
in; actors on one node share its memory: ``BGE_TRIO_PROCESSES`` is set to the actors per
node), and each writing its shards' parts itself, straight to the output (a shared
filesystem or an object store), so vectors never pass through the driver.

The driver keeps two shards queued per actor, so an actor never waits for its next
shard. A killed actor is restarted and its shard retried (``max_restarts``,
``max_task_retries``); a part is written whole under a name fixed by the shard's
position, so a retried shard replaces the same file, never adds a second.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import attrs

from bge_trio.bulk.job import Job, Runner, Summary, run_job
from bge_trio.bulk.parts import PartWriter, Shard, ShardDone, describe
from bge_trio.bulk.rows import IdType
from bge_trio.bulk.store import Location
from bge_trio.config import PREFIX, Settings
from bge_trio.model.encoder import Output
from bge_trio.model.source import ModelSource, resolve_model

log = logging.getLogger("bge_trio.bulk")
# The driver reads and sends rows: light next to the actors' forward passes, so an actor
# asks for less than its threads in CPUs and the driver always finds room.
ACTOR_CPU_SHARE = 0.8
QUEUED_PER_ACTOR = 2
STORE_ENV = ("AWS_", "GOOGLE_", "AZURE_")  # object-store credentials the actors need too


@attrs.frozen
class RayOptions:
    address: str  # "auto", "local" (start one here) or host:port
    actors: int | None = None  # None: from the cluster's CPUs
    threads_per_actor: int = 1


class EmbedActor:
    """One model per actor; ``run`` embeds a shard and writes its part."""

    def __init__(
        self,
        env: dict[str, str],
        model: str,
        outputs: frozenset[Output],
        output: str,
        id_type: IdType,
        threads: int,
    ) -> None:
        os.environ.update({k: v for k, v in env.items() if k.startswith(STORE_ENV)})
        settings = Settings.from_env(env)
        from bge_trio.bulk.embedder import BulkEmbedder

        embedder = BulkEmbedder(settings, resolve_model(model), outputs, threads=threads)
        self._described = describe(embedder, settings)
        self._writer = PartWriter(embedder, Location.parse(output), id_type, self._described[0])

    def describe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._described

    def run(self, shard: Shard) -> ShardDone:
        return self._writer.run(shard)


class RayRunner:
    def __init__(
        self,
        options: RayOptions,
        model: str,
        outputs: frozenset[Output],
        output: Location,
        id_type: IdType,
    ) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=None if options.address == "local" else options.address,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
        cpus = float(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        threads = options.threads_per_actor
        count = options.actors or max(1, int(cpus // threads))
        processes = math.ceil(count / max(1, len(alive)))
        env = {k: v for k, v in os.environ.items() if k.startswith((PREFIX, *STORE_ENV))}
        env[PREFIX + "PROCESSES"] = str(processes)
        actor: Any = ray.remote(EmbedActor).options(
            num_cpus=ACTOR_CPU_SHARE * threads, max_restarts=-1, max_task_retries=-1
        )
        self._actors: list[Any] = [
            actor.remote(env, model, outputs, output.spec, id_type, threads) for _ in range(count)
        ]
        log.info("%d Ray actors x %d threads on %d nodes", count, threads, len(alive))

    def describe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        import ray

        model, memory = ray.get(self._actors[0].describe.remote())
        return model, memory

    def run(self, shards: Iterator[Shard]) -> Iterator[ShardDone]:
        import ray

        queued: dict[Any, Any] = {}  # task -> actor
        load = {id(actor): 0 for actor in self._actors}

        def finished() -> ShardDone:
            (task,), _ = ray.wait(list(queued), num_returns=1)
            load[id(queued.pop(task))] -= 1
            done: ShardDone = ray.get(task)
            return done

        try:
            for shard in shards:
                while len(queued) >= QUEUED_PER_ACTOR * len(self._actors):
                    yield finished()
                actor = min(self._actors, key=lambda a: load[id(a)])
                load[id(actor)] += 1
                queued[actor.run.remote(shard)] = actor
            while queued:
                yield finished()
        finally:
            for actor in self._actors:
                ray.kill(actor)


def run_on_ray(job: Job, settings: Settings, source: ModelSource, options: RayOptions) -> Summary:
    """The job on the cluster at ``options.address``."""

    def runner_for(output: Location, id_type: IdType) -> Runner:
        return RayRunner(options, str(source.path), job.outputs, output, id_type)

    return run_job(job, settings, source, runner_for)
