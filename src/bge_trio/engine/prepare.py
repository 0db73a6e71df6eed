"""The one startup sequence: from a model directory to what an engine serves with.

    load_model    prepare the process, load the encoder        (state Loading)
    plan_serving  weights resident, the memory budget, the cost model (overrides, cache,
                  probe or the conservative fallback), one max-length text must fit, the
                  batch policy                                  (state Probing)

:func:`prepare` runs both, for the commands that need no server (``bge-trio probe``,
``bge-trio embed`` and its Ray actors); the server's :class:`~bge_trio.engine.Engine`
runs the same two steps with its state changing between them. Same settings, same
steps, same probe cache key: the three get the same cost model. Everything here is
synchronous torch and file work: run it on a forward thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import attrs

from bge_trio.config import Settings
from bge_trio.engine.backend import choose_by_measuring, decided, openvino_target
from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.plan import MemoryPlan, Planner, check_fits, measure_budget, plan_memory
from bge_trio.memory.probe import Progress
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource
from bge_trio.process import prepare_process
from bge_trio.scheduler.batching import BatchPolicy

log = logging.getLogger("bge_trio.engine")

LoadEncoder = Callable[..., Encoder]


@attrs.frozen(eq=False)
class Prepared:
    """What an engine serves with: the model, its memory plan and the batch policy."""

    encoder: Encoder
    memory: MemoryPlan
    policy: BatchPolicy


def prepare(
    settings: Settings,
    source: ModelSource,
    *,
    threads: int,
    workers: int,
    root: Path = Path("/"),
    planner: Planner = plan_memory,
    load: LoadEncoder = load_encoder,
    progress: Progress | None = None,
) -> Prepared:
    """Load the model and plan its memory: the whole startup sequence."""
    encoder = load_model(settings, source, threads=threads, load=load)
    return plan_serving(
        encoder, settings, workers=workers, root=root, planner=planner, progress=progress
    )


def load_model(
    settings: Settings,
    source: ModelSource,
    *,
    threads: int,
    express_threads: int = 0,
    load: LoadEncoder = load_encoder,
    on_step: Callable[[str], None] | None = None,
    root: Path = Path("/"),
) -> Encoder:
    """Prepare this process for inference and load the encoder on the backend the
    settings choose (``threads``: the threads of a regular pass, torch's for work started
    from the calling thread; ``express_threads``: the express lane's, 0 without one)."""
    prepare_process(settings.allocator)
    started = time.perf_counter()
    target = openvino_target(settings, source, express_threads=express_threads, on_step=on_step)
    load = partial(
        load,
        source,
        name=settings.model_name,
        max_seq_length=settings.max_seq_length,
        dtype=settings.dtype,
        threads=threads,
    )
    if target is None:
        encoder = load()
    elif settings.backend == "openvino" or decided(target) == "openvino":
        encoder = load(openvino=target)
    elif decided(target) == "torch":
        encoder = load()
    else:
        encoder = choose_by_measuring(settings, load(), target, threads, root)
    info = encoder.info
    log.info(
        "loaded %s from %s in %.2fs (backend %s, dim %d, max_seq %d, outputs %s, dtype %s: %s, "
        "%d threads)",
        info.name,
        source.path,
        time.perf_counter() - started,
        encoder.backend,
        info.dimension,
        info.max_seq_length,
        ",".join(sorted(info.outputs)),
        info.dtype,
        info.dtype_reason,
        threads,
    )
    return encoder


def plan_serving(
    encoder: Encoder,
    settings: Settings,
    *,
    workers: int,
    root: Path = Path("/"),
    planner: Planner = plan_memory,
    progress: Progress | None = None,
) -> Prepared:
    """Budget, cost model and policy for a loaded encoder.

    ``workers`` is every forward pass that may run at once in this process (all engines'
    regular workers): each gets an equal share of what the limit leaves after the
    resident size (every model loaded) and the headroom. A planner that crashes leaves the
    conservative model (status ``failed``); a limit too small for one text of the maximum
    length raises :class:`~bge_trio.memory.plan.MemoryTooSmallError`.
    """
    budget = measure_budget(encoder, settings, root, workers=workers)
    log.info(
        "memory limit %d bytes from %s; model resident %d bytes; budget %d bytes per forward",
        budget.limit.bytes,
        budget.limit.source,
        budget.model_resident_bytes,
        budget.workspace_bytes,
    )
    try:
        memory = planner(encoder, settings, budget, progress=progress)
    except Exception as exc:
        # A probe that crashes must not stop the server: serve with the safe model.
        log.exception("memory planning crashed; using the conservative cost model")
        memory = MemoryPlan("failed", CONSERVATIVE, budget, detail=f"{type(exc).__name__}: {exc}")
    check_fits(memory, encoder.info.max_seq_length)
    policy = BatchPolicy(
        memory.cost, budget.workspace_bytes, max_batch_tokens=settings.max_batch_tokens
    )
    return Prepared(encoder, memory, policy)
