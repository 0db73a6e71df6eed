"""Startup: load the model, plan its memory, check that it answers, open the gate.

Runs as a task in the app's nursery, after the ASGI lifespan has already returned
(hypercorn gives startup 60 s; real BGE-M3 plus a probe can take longer):

    loading -> probing -> ok          the gate opens
                       -> ok (probe "failed": conservative model; the gate opens)
            -> error                  the model or the memory limit makes serving impossible

Afterwards it keeps the memory model honest: a served pass that peaks above its
prediction scales the cost model (see :mod:`bge_trio.memory.recalibrate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import attrs
import trio

from bge_trio import metrics
from bge_trio.config import Settings
from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.plan import (
    MemoryPlan,
    MemoryTooSmallError,
    Planner,
    check_fits,
    measure_budget,
    store_correction,
    time_passes,
)
from bge_trio.memory.probe import ProbeProgress
from bge_trio.memory.recalibrate import Recalibrator
from bge_trio.model.encoder import Encoder, ModelConfigError
from bge_trio.model.source import ModelSource
from bge_trio.process import prepare_process
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.scheduler import Scheduler
from bge_trio.scheduler.threads import ForwardThreads

log = logging.getLogger("bge_trio.service")

Status = Literal["loading", "probing", "ok", "error"]
# Served passes below this share of the workspace are not used to recalibrate.
RECALIBRATE_MIN_SHARE = 0.05
# Distinct timed shapes that fit the pace's three terms (see PassPace.seed).
PACE_SHAPES = 3


class Startup:
    """The startup sequence and what it found: status, encoder, memory plan, error."""

    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        scheduler: Scheduler,
        threads: ForwardThreads,
        gate: Gate,
        *,
        root: Path,
        planner: Planner,
        load_encoder: Callable[..., Encoder],
    ) -> None:
        self.settings = settings
        self.source = source
        self._scheduler = scheduler
        self._threads = threads
        self._gate = gate
        self._lanes = threads.lanes
        self._root = root  # where /proc and /sys are read (tests use a fake tree)
        self._planner = planner
        self._load_encoder = load_encoder
        self.status: Status = "loading"
        self.encoder: Encoder | None = None
        self.memory: MemoryPlan | None = None
        self.error: str | None = None
        self.probe_progress: ProbeProgress | None = None
        self.failed = trio.Event()  # set when startup fails for good
        self.settled = trio.Event()  # the model loaded, startup failed, or shutdown began
        self.recalibrator = Recalibrator()
        self._stored_correction = 1.0
        self._nursery: trio.Nursery | None = None

    async def run(self, nursery: trio.Nursery | None = None) -> None:
        """Load, plan memory, check readiness, then open the gate (always).

        ``nursery`` runs later work (keeping a confirmed correction in the probe cache).
        """
        self._nursery = nursery
        scheduler = self._scheduler
        try:
            prepare_process(self.settings.allocator)
            # torch work runs where the forward passes will (see ForwardThreads.run_first)
            self.encoder = await self._threads.run_first(self._load, self._lanes.threads)
            self.settled.set()
            self.status = "probing"
            self.memory = await self._threads.run_first(self._plan_memory)
            scheduler.set_policy(
                BatchPolicy(
                    self.memory.cost,
                    self.memory.budget.workspace_bytes,
                    max_batch_tokens=self.settings.max_batch_tokens,
                )
            )
            scheduler.seed_pace(await self._pace_seed())
            await self._threads.run_first(self._readiness_check)
            _publish_memory_metrics(self.memory)
            self.status = "ok"
            log.info(
                "ready: model %s, probe %s, a=%.0f b=%.2f c=%.0f, budget %d bytes per forward",
                self.encoder.info.name,
                self.memory.status,
                self.memory.cost.a,
                self.memory.cost.b,
                self.memory.cost.c,
                self.memory.budget.workspace_bytes,
            )
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.critical("startup failed: %s", reason, exc_info=exc if not _expected(exc) else None)
            self.fail(reason, exc)
        finally:
            # Never leave the gate closed: waiting requests must get an answer.
            self._gate.open()

    def fail(self, reason: str, exc: BaseException) -> None:
        """Serving is impossible: keep why, answer what waits, and let the process exit."""
        self.status = "error"
        self.error = reason
        self._scheduler.fail_all(exc)  # texts queued during startup get their answer now
        self.failed.set()
        self.settled.set()

    def require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("model not loaded")
        return self.encoder

    def require_memory(self) -> MemoryPlan:
        if self.memory is None:
            raise RuntimeError("memory not planned")
        return self.memory

    def _load(self, threads: int) -> Encoder:
        started = time.perf_counter()
        encoder = self._load_encoder(
            self.source,
            name=self.settings.model_name,
            max_seq_length=self.settings.max_seq_length,
            dtype=self.settings.dtype,
            threads=threads,
        )
        info = encoder.info
        log.info(
            "loaded %s from %s in %.2fs (dim %d, max_seq %d, outputs %s, dtype %s: %s, %d threads)",
            info.name,
            self.source.path,
            time.perf_counter() - started,
            info.dimension,
            info.max_seq_length,
            ",".join(sorted(info.outputs)),
            info.dtype,
            info.dtype_reason,
            threads,
        )
        return encoder

    def _plan_memory(self) -> MemoryPlan:
        encoder = self.require_encoder()
        budget = measure_budget(encoder, self.settings, self._root, workers=self._lanes.workers)
        log.info(
            "memory limit %d bytes from %s; model resident %d bytes; budget %d bytes per forward",
            budget.limit.bytes,
            budget.limit.source,
            budget.model_resident_bytes,
            budget.workspace_bytes,
        )
        try:
            plan = self._planner(encoder, self.settings, budget, progress=self._probe_step)
        except Exception as exc:
            # A probe that crashes must not stop the server: serve with the safe model.
            log.exception("memory planning crashed; using the conservative cost model")
            plan = MemoryPlan("failed", CONSERVATIVE, budget, detail=f"{type(exc).__name__}: {exc}")
        check_fits(plan, encoder.info.max_seq_length)
        return plan

    def _probe_step(self, step: ProbeProgress) -> None:
        self.probe_progress = step
        log.info(
            "probe %d/%d: batch %d x %d tokens peaked at %d bytes (%.1fs so far, ~%.0fs to go)",
            step.done,
            step.total,
            step.point.batch,
            step.point.seq,
            step.point.peak_bytes,
            step.elapsed_s,
            step.remaining_s,
        )

    async def _pace_seed(self) -> tuple[tuple[int, int, float], ...]:
        """The first pace: admission never judges the first requests without one.

        With one regular worker, the probe's timed passes (or, where it timed too few,
        passes timed now). With several, passes timed now on every worker at once, the
        slowest of each shape: passes that share the cores run slower than one alone
        (all-MiniLM-L6-v2, two workers on two cores: 0.3 ms per token alone, 0.5 side
        by side), and a pace learnt alone admits requests that then time out.
        """
        encoder = self.require_encoder()
        timed = self.require_memory().pass_seconds
        try:
            if len(self._threads.regular) > 1:
                side_by_side = await self._threads.run_each(time_passes, encoder)
                slowest = zip(*side_by_side, strict=True)
                return tuple(max(timings, key=lambda timing: timing[2]) for timings in slowest)
            if len({(batch, seq) for batch, seq, _ in timed}) >= PACE_SHAPES:
                return timed
            return await self._threads.run_first(time_passes, encoder)
        except Exception:  # the readiness check says whether the model can serve at all
            log.warning("could not time passes for a first pace", exc_info=True)
            return timed

    def _readiness_check(self) -> None:
        encoder = self.require_encoder()
        (result,) = encoder.forward(encoder.tokenize(["readiness check"]), encoder.info.outputs)
        if result.dense is None or not result.dense.any():
            raise RuntimeError("readiness check produced an empty embedding")

    # -- after startup: keep the cost model honest -------------------------------------

    def pass_peaked(self, batch: int, seq: int, peak: int) -> None:
        """A served pass ran alone and peaked at ``peak`` bytes: compare with its prediction."""
        plan = self.memory
        if plan is None or self.status != "ok":
            return
        scheduler = self._scheduler
        policy = scheduler.policy
        # Passes this small are noise against the workspace; the target and the risk
        # are in the large ones.
        if peak < RECALIBRATE_MIN_SHARE * policy.workspace_bytes:
            return
        overrun = self.recalibrator.observe(batch, seq, peak, policy.cost.predict(batch, seq))
        if overrun is None:
            return
        correction = self.recalibrator.correction
        scheduler.set_policy(
            attrs.evolve(scheduler.given_policy, cost=plan.cost.scaled(correction))
        )
        log.warning(
            "a pass of %d x %d tokens peaked at %d bytes, %.0f%% above the %d predicted; "
            "the cost model is now scaled by %.3f (the largest text that fits: %d tokens)",
            batch,
            seq,
            peak,
            100 * (overrun.ratio - 1),
            overrun.predicted_bytes,
            correction,
            scheduler.policy.max_single_length(),
        )
        metrics.COST_CORRECTION.set(correction)
        if self.recalibrator.statistics().confirmed and self._nursery is not None:
            self._nursery.start_soon(self._keep_correction, plan, correction)

    async def _keep_correction(self, plan: MemoryPlan, correction: float) -> None:
        if correction <= self._stored_correction:
            return
        self._stored_correction = correction
        try:
            path = await trio.to_thread.run_sync(store_correction, plan, self.settings, correction)
        except OSError as exc:
            log.warning("could not keep the corrected cost model in the probe cache (%s)", exc)
            return
        if path is not None:
            log.info("corrected cost model (x%.3f) kept in %s", correction, path)


def _publish_memory_metrics(plan: MemoryPlan) -> None:
    for status in ("running", "complete", "failed", "cache_hit", "disabled"):
        metrics.PROBE_STATUS.labels(status).set(1 if status == plan.status else 0)
    metrics.COST_A.set(plan.cost.a)
    metrics.COST_B.set(plan.cost.b)
    metrics.COST_C.set(plan.cost.c)
    metrics.MEMORY_LIMIT.set(plan.budget.limit.bytes)
    metrics.FORWARD_BUDGET.set(plan.budget.workspace_bytes)


def _expected(exc: Exception) -> bool:
    """Startup failures whose message says everything (no stack trace needed)."""
    return isinstance(exc, MemoryTooSmallError | ModelConfigError | OSError)
