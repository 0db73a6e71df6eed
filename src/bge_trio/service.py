"""The embedding service: startup (load, probe, open the gate) and ``embed``.

This is what the HTTP routes call. It owns the gate, the scheduler and the
encoder, and turns texts or token ids into embeddings under every rule the
server promises: the maximum sequence length, truncation, the memory budget, and
a clear error for each way a request can be refused.

Startup runs as a task in the app's nursery, after the ASGI lifespan has already
returned (hypercorn gives startup 60 s; real BGE-M3 plus a probe can take longer):

    loading -> probing -> ok          the gate opens
                       -> ok (probe "failed": conservative model; the gate opens)
            -> error                  the model or the memory limit makes serving impossible

Shutdown (``begin_shutdown``, when the process is told to stop) drains: new work
is refused with 503, accepted work that can finish within the window finishes,
and the rest is answered 503 at once, so every request has its answer before the
server closes its connections.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
import trio

from bge_trio import __version__, metrics
from bge_trio.cgroups import CpuLimit, detect_cpu_limit
from bge_trio.config import LongInput, Settings
from bge_trio.errors import (
    BatchFailed,
    NotReady,
    Overloaded,
    ServerFailed,
    ShuttingDown,
    TooLarge,
    invalid,
)
from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.plan import (
    MemoryPlan,
    MemoryTooSmallError,
    Planner,
    check_fits,
    measure_budget,
    plan_memory,
    store_correction,
)
from bge_trio.memory.probe import PeakMeter, ProbeProgress
from bge_trio.memory.recalibrate import Recalibrator
from bge_trio.model.encoder import (
    BetweenLayers,
    Embedding,
    Encoder,
    ModelConfigError,
    ModelInfo,
    Output,
    Token,
)
from bge_trio.model.source import ModelSource
from bge_trio.model.windows import Windows, merge, split
from bge_trio.process import prepare_process
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.lanes import Lanes, plan_lanes
from bge_trio.scheduler.scheduler import (
    BatchFailedError,
    QueueFullError,
    Scheduler,
    ShuttingDownError,
    Timing,
    TooSlowError,
    unlimited_policy,
)
from bge_trio.scoring import MODES, Weights, combine, score_matrix

log = logging.getLogger(__name__)

Status = Literal["loading", "probing", "ok", "error"]
# Served passes below this share of the workspace are not used to recalibrate.
RECALIBRATE_MIN_SHARE = 0.05


@attrs.frozen(eq=False)
class Embedded:
    """Results of one request, in input order, with the tokens that went in."""

    embeddings: list[Embedding]
    token_ids: list[list[int]]
    timing: Timing = attrs.field(factory=Timing)
    embedded_tokens: int | None = None  # every token embedded, when inputs were split

    @property
    def prompt_tokens(self) -> int:
        if self.embedded_tokens is not None:
            return self.embedded_tokens
        return sum(len(ids) for ids in self.token_ids)


@attrs.frozen(eq=False)
class Scored:
    """Score matrices (queries x documents) by mode, the modes used, and tokens embedded."""

    scores: dict[str, npt.NDArray[np.float32]]
    modes: tuple[Output, ...]
    prompt_tokens: int


class EmbeddingService:
    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        *,
        root: Path = Path("/"),
        planner: Planner = plan_memory,
        load_encoder: Callable[..., Encoder] = Encoder.load,
    ) -> None:
        self.settings = settings
        self.source = source
        self.root = root  # where /proc and /sys are read (tests use a fake tree)
        self._planner = planner
        self._load_encoder = load_encoder
        self.cpu: CpuLimit = detect_cpu_limit(root)
        self.lanes: Lanes = plan_lanes(self.cpu.threads, settings.workers, settings.express_tokens)
        self.gate = Gate(self.lanes.workers)
        self.scheduler = Scheduler(
            self._forward,
            self.gate,
            unlimited_policy(),
            lanes=self.lanes,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_queue_items=settings.max_queue_items,
            max_queue_tokens=settings.max_queue_tokens,
            max_wait_s=settings.request_timeout_s,
            observer=metrics.SchedulerMetrics(),
            meter=_pass_meter(),
            on_peak=self._pass_peaked,
        )
        self.recalibrator = Recalibrator()
        self._stored_correction = 1.0
        self._nursery: trio.Nursery | None = None
        self.status: Status = "loading"
        self.encoder: Encoder | None = None
        self.memory: MemoryPlan | None = None
        self.error: str | None = None
        self.probe_progress: ProbeProgress | None = None
        self.failed = trio.Event()  # set when startup fails for good
        self._settled = trio.Event()  # the model loaded, startup failed, or shutdown began
        self.draining = False
        self.requests_in_flight = 0  # embedding and score requests not yet answered

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler and the startup sequence until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._supervise_scheduler)
            task_status.started()
            await self.start()

    async def _supervise_scheduler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A crashed scheduler would leave every request waiting forever: fail loudly instead."""
        try:
            await self.scheduler.run(task_status=task_status)
        except Exception as exc:
            log.critical("the scheduler crashed; the server cannot serve", exc_info=exc)
            self.status = "error"
            self.error = "the scheduler crashed"
            self.scheduler.fail_all(exc)
            self.failed.set()

    async def start(self) -> None:
        """Load the model, plan memory, check readiness, then open the gate (always)."""
        try:
            prepare_process(self.settings.allocator)
            # torch work runs where the forward passes will (see Scheduler.on_forward_thread)
            self.encoder = await self.scheduler.on_forward_thread(self._load, self.lanes.threads)
            self._settled.set()
            self.status = "probing"
            self.memory = await self.scheduler.on_forward_thread(self._plan_memory)
            self.scheduler.set_policy(
                BatchPolicy(
                    self.memory.cost,
                    self.memory.budget.workspace_bytes,
                    max_batch_tokens=self.settings.max_batch_tokens,
                )
            )
            self.scheduler.seed_pace(self.memory.pass_seconds)
            await self.scheduler.on_forward_thread(self._readiness_check)
            self._publish_memory_metrics(self.memory)
            self.status = "ok"
            log.info(
                "ready: model %s, probe %s, a=%.0f b=%.2f c=%.0f, budget %d bytes per forward",
                self.info.name,
                self.memory.status,
                self.memory.cost.a,
                self.memory.cost.b,
                self.memory.cost.c,
                self.memory.budget.workspace_bytes,
            )
        except Exception as exc:
            self.status = "error"
            self.error = str(exc) or type(exc).__name__
            log.critical("startup failed: %s", self.error, exc_info=not _expected(exc))
            self.scheduler.fail_all(exc)  # texts queued during startup get their answer now
            self.failed.set()
            self._settled.set()
        finally:
            # Never leave the gate closed: waiting requests must get an answer.
            self.gate.open()

    def _load(self, threads: int) -> Encoder:
        started = time.perf_counter()
        encoder = self._load_encoder(
            self.source,
            name=self.settings.model_name,
            max_seq_length=self.settings.max_seq_length,
            dtype=self.settings.dtype,
            threads=threads,
        )
        log.info(
            "loaded %s from %s in %.2fs (dim %d, max_seq %d, outputs %s, dtype %s: %s, %d threads)",
            encoder.info.name,
            self.source.path,
            time.perf_counter() - started,
            encoder.info.dimension,
            encoder.info.max_seq_length,
            ",".join(sorted(encoder.info.outputs)),
            encoder.info.dtype,
            encoder.info.dtype_reason,
            threads,
        )
        return encoder

    def _plan_memory(self) -> MemoryPlan:
        encoder = self._require_encoder()
        budget = measure_budget(encoder, self.settings, self.root, workers=self.lanes.workers)
        limit = budget.limit
        log.info(
            "memory limit %d bytes from %s; model resident %d bytes; budget %d bytes per forward",
            limit.bytes,
            limit.source,
            budget.model_resident_bytes,
            budget.workspace_bytes,
        )

        def progress(step: ProbeProgress) -> None:
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

        try:
            plan = self._planner(encoder, self.settings, budget, progress=progress)
        except Exception as exc:
            # A probe that crashes must not stop the server: serve with the safe model.
            log.exception("memory planning crashed; using the conservative cost model")
            plan = MemoryPlan("failed", CONSERVATIVE, budget, detail=f"{type(exc).__name__}: {exc}")
        check_fits(plan, encoder.info.max_seq_length)
        return plan

    @staticmethod
    def _publish_memory_metrics(plan: MemoryPlan) -> None:
        for status in ("running", "complete", "failed", "cache_hit", "disabled"):
            metrics.PROBE_STATUS.labels(status).set(1 if status == plan.status else 0)
        metrics.COST_A.set(plan.cost.a)
        metrics.COST_B.set(plan.cost.b)
        metrics.COST_C.set(plan.cost.c)
        metrics.MEMORY_LIMIT.set(plan.budget.limit.bytes)
        metrics.FORWARD_BUDGET.set(plan.budget.workspace_bytes)

    def _pass_peaked(self, batch: int, seq: int, peak: int) -> None:
        """A served pass ran alone and peaked at ``peak`` bytes: compare with its prediction."""
        plan = self.memory
        if plan is None or self.status != "ok":
            return
        policy = self.scheduler.policy
        # Passes this small are noise against the workspace; the target and the risk
        # are in the large ones.
        if peak < RECALIBRATE_MIN_SHARE * policy.workspace_bytes:
            return
        overrun = self.recalibrator.observe(batch, seq, peak, policy.cost.predict(batch, seq))
        if overrun is None:
            return
        correction = self.recalibrator.correction
        given = self.scheduler.given_policy
        self.scheduler.set_policy(attrs.evolve(given, cost=plan.cost.scaled(correction)))
        log.warning(
            "a pass of %d x %d tokens peaked at %d bytes, %.0f%% above the %d predicted; "
            "the cost model is now scaled by %.3f (the largest text that fits: %d tokens)",
            batch,
            seq,
            peak,
            100 * (overrun.ratio - 1),
            overrun.predicted_bytes,
            correction,
            self.scheduler.policy.max_single_length(),
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

    def _readiness_check(self) -> None:
        encoder = self._require_encoder()
        (result,) = encoder.forward(encoder.tokenize(["readiness check"]), encoder.info.outputs)
        if result.dense is None or not result.dense.any():
            raise RuntimeError("readiness check produced an empty embedding")

    # -- shutdown -----------------------------------------------------------------------

    def begin_shutdown(self, window_s: float) -> None:
        """Drain: refuse new work; keep what finishes within ``window_s``; answer the rest.

        Requests whose texts, at the learnt pace, cannot finish in the window are answered
        503 now (their clients retry elsewhere sooner); at the end of the window anything
        still waiting is answered 503 too. Idempotent: a second signal changes nothing.
        """
        if self.draining:
            return
        self.draining = True
        deadline = trio.current_time() + window_s
        self._settled.set()  # requests waiting for the model get their answer now
        refused = self.scheduler.close(deadline)
        log.warning(
            "shutting down: new requests are refused; of %d in flight, %d could not finish "
            "within %.1f s and were answered 503 now; the rest finish or are answered by then",
            self.requests_in_flight,
            refused,
            window_s,
        )
        if self._nursery is not None:
            self._nursery.start_soon(self._end_of_drain, deadline)

    async def _end_of_drain(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self.scheduler.fail_everything(ShuttingDownError("shutting down"))

    # -- serving ------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._require_encoder().info

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("model not loaded")
        return self.encoder

    def _forward(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None = None,
    ) -> list[Embedding]:
        return self._require_encoder().forward(batch, outputs, between_layers)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return list(self._require_encoder().tokenizer.convert_ids_to_tokens(list(ids)))

    async def ready(self, arrived: float | None = None) -> Encoder:
        """Wait (up to the startup wait from ``arrived``) for the model; 503 if not loaded.

        The model is needed to validate and tokenise a request. Its forward passes may
        still wait at the closed gate while the probe runs (see ``_submit``).
        """
        if self.encoder is None and self.status != "error":
            start = trio.current_time() if arrived is None else arrived
            with trio.move_on_at(start + self.settings.startup_wait_s):
                await self._settled.wait()
        if self.draining:
            raise _shutting_down()
        if self.status == "error":
            raise _server_failed()
        if self.encoder is None:
            raise NotReady(
                f"the model is still {self.status}; retry shortly",
                retry_after_s=5,
                code="not_ready",
            )
        return self.encoder

    async def _submit(
        self, ids: list[list[int]], outputs: frozenset[Output], arrived: float, timing: Timing
    ) -> list[Embedding]:
        """Queue the texts; while the gate is still closed, give up at the startup wait."""
        with self.gate.until(arrived + self.settings.startup_wait_s) as waited:
            return await self.scheduler.submit(ids, outputs, timing)
        assert waited.cancelled_caught
        raise NotReady(
            f"the server is still {self.status}; retry shortly", retry_after_s=5, code="not_ready"
        )

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.requests_in_flight += 1
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.requests_in_flight -= 1
            metrics.REQUESTS_IN_FLIGHT.dec()

    @property
    def healthy(self) -> bool:
        """Ready, not draining, and the last forward passes did not all fail."""
        return (
            self.status == "ok"
            and not self.draining
            and self.scheduler.statistics().consecutive_failures < self.settings.failure_threshold
        )

    async def embed(
        self,
        texts: Sequence[str] | None,
        token_ids: Sequence[Sequence[int]] | None,
        outputs: frozenset[Output],
        long_input: LongInput | None = None,
        arrived: float | None = None,
    ) -> Embedded:
        """Embed a request's inputs (texts or token id lists) in input order.

        ``long_input`` says what happens to an input longer than the model or the
        memory budget allows (the server's ``BGE_TRIO_LONG_INPUT`` by default):
        ``truncate`` it, refuse it (``error``), or ``chunk`` it into overlapping
        windows whose results are merged (see :mod:`bge_trio.model.windows`).
        """
        with self._in_flight():
            return await self._embed(texts, token_ids, outputs, long_input, arrived)

    async def _embed(
        self,
        texts: Sequence[str] | None,
        token_ids: Sequence[Sequence[int]] | None,
        outputs: frozenset[Output],
        long_input: LongInput | None,
        arrived: float | None,
    ) -> Embedded:
        arrived = trio.current_time() if arrived is None else arrived  # one startup wait
        encoder = await self.ready(arrived)
        missing = outputs - encoder.info.outputs
        if missing:
            raise invalid(
                f"model {encoder.info.name!r} has no {' or '.join(sorted(missing))} head; it "
                f"offers: {', '.join(sorted(encoder.info.outputs))}",
                param="model",
                code="output_not_supported",
            )
        with self.scheduler.arriving():  # a batch about to start may wait for these texts
            if texts is not None:
                ids = await trio.to_thread.run_sync(encoder.tokenize, texts)
            else:
                ids = self._check_token_ids(encoder, token_ids or [])
        windows = self._fit_lengths(encoder, ids, long_input or self.settings.long_input)
        flat = [list(window) for w in windows for window in w.token_ids]
        timing = Timing()
        try:
            results = await self._submit(flat, outputs, arrived, timing)
        except BatchFailedError:
            if self.status == "error":
                raise _server_failed() from None
            raise BatchFailed("a forward pass failed") from None
        except QueueFullError as exc:
            raise Overloaded(
                f"the server is at capacity ({exc}); retry after a short wait",
                retry_after_s=exc.retry_after_s,
                code="queue_full",
            ) from None
        except TooSlowError as exc:
            raise _too_slow(exc) from None
        except ShuttingDownError:
            raise _shutting_down() from None
        return _merged(ids, windows, results, timing)

    async def score(
        self, queries: Sequence[str], documents: Sequence[str], weights: Weights
    ) -> Scored:
        """Embed queries and documents together, then score every pair off the event loop."""
        with self._in_flight():
            return await self._score(queries, documents, weights)

    async def _score(
        self, queries: Sequence[str], documents: Sequence[str], weights: Weights
    ) -> Scored:
        encoder = await self.ready()
        modes = [mode for mode in MODES if mode in encoder.info.outputs]
        if sum(weights.of(mode) for mode in modes) <= 0:
            raise invalid(
                f"'weights' must give a positive weight to at least one of: {', '.join(modes)}",
                param="weights",
                code="invalid_weights",
            )
        embedded = await self._embed([*queries, *documents], None, frozenset(modes), None, None)
        q, d = embedded.embeddings[: len(queries)], embedded.embeddings[len(queries) :]

        def compute() -> dict[str, npt.NDArray[np.float32]]:
            return combine(score_matrix(q, d, modes), weights)

        return Scored(await trio.to_thread.run_sync(compute), tuple(modes), embedded.prompt_tokens)

    async def tokens(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[Token]]:
        encoder = await self.ready()
        return await trio.to_thread.run_sync(encoder.tokens, texts, add_special_tokens)

    async def decode(
        self, token_ids: Sequence[Sequence[int]], skip_special_tokens: bool
    ) -> list[str]:
        encoder = await self.ready()
        checked = self._check_token_ids(encoder, token_ids, param="ids")
        return await trio.to_thread.run_sync(encoder.decode, checked, skip_special_tokens)

    @staticmethod
    def _check_token_ids(
        encoder: Encoder, token_ids: Sequence[Sequence[int]], param: str = "input"
    ) -> list[list[int]]:
        vocab = encoder.info.vocab_size
        for index, ids in enumerate(token_ids):
            for token in ids:
                if not 0 <= token < vocab:
                    raise invalid(
                        f"{param}[{index}] has token id {token}, outside this model's vocabulary "
                        f"[0, {vocab})",
                        param=param,
                        code="invalid_token_id",
                    )
        return [list(ids) for ids in token_ids]

    def _fit_lengths(
        self, encoder: Encoder, token_ids: list[list[int]], long_input: LongInput
    ) -> list[Windows]:
        """Each input as the windows it runs in: one, unless it is chunked."""
        max_seq = encoder.info.max_seq_length
        fits = min(max_seq, self.scheduler.policy.max_single_length())
        window = min(self.settings.chunk_window or fits, fits)
        overlap = min(self.settings.chunk_overlap, max(0, (window - 2) // 2))
        fitted = []
        for index, ids in enumerate(token_ids):
            if long_input == "chunk" and len(ids) > window:
                fitted.append(split(ids, window, overlap, encoder.closing_ids))
                continue
            if len(ids) > max_seq and long_input == "error":
                raise invalid(
                    f"input[{index}] has {len(ids)} tokens, more than the maximum of "
                    f"{max_seq}; shorten it, or send 'long_input': 'truncate' or 'chunk'",
                    param="input",
                    code="context_length_exceeded",
                )
            if len(ids) > fits and long_input == "error":
                raise TooLarge(
                    f"input[{index}] has {len(ids)} tokens; the largest text that fits this "
                    f"server's memory budget has {fits} tokens; shorten it, or send "
                    "'long_input': 'truncate' or 'chunk'",
                    param="input",
                    code="input_too_large_for_memory",
                )
            fitted.append(Windows((tuple(encoder.truncate(ids, fits)),), 0))
        return fitted

    def speed(self) -> dict[str, object]:
        """What the scheduler has learnt about forward passes (None until measured)."""
        stats = self.scheduler.statistics()
        curve = stats.pace_curve
        sample = self.scheduler.predict_seconds(1, 512)
        return {
            "passes_observed": stats.passes_observed,
            "pass_overhead_ms": None if curve is None else round(curve[0] * 1000, 3),
            "pass_overhead_tokens": round(stats.pace_overhead_tokens, 1),
            "us_per_token": None if curve is None else round(curve[1] * 1e6, 3),
            "us_per_token_per_1k_length": None if curve is None else round(curve[2] * 1e9, 4),
            "tokens_per_s_at_512": None if sample is None else round(512 / sample, 1),
            "express_lane": {
                "max_tokens": self.lanes.express_tokens,
                "open": stats.express_open,
                "passes": stats.express_passes,
            },
            "passes_stopped_early": stats.passes_stopped_early,
        }

    def describe(self) -> dict[str, Any]:
        """The body of ``/info``: the server, the model, the memory model and the pace."""
        lanes, settings = self.lanes, self.settings
        body: dict[str, Any] = {
            "version": __version__,
            "status": self.status,
            "workers": lanes.workers,
            "threads_per_pass": lanes.threads,
            "express_lane": {
                "max_tokens": lanes.express_tokens,
                "threads": lanes.express_threads,
                "regular_threads_beside_it": lanes.shared_threads,
            },
            "processes": settings.processes,
            "max_batch": settings.max_batch,
            "long_input": settings.long_input,
            "truncate": settings.long_input == "truncate",
            "cpu": {
                "threads": self.cpu.threads,
                "cpus": self.cpu.cpus,
                "affinity": self.cpu.affinity,
                "source": self.cpu.source,
            },
        }
        if self.encoder is not None:
            info = self.info
            body.update(
                {
                    "model_id": info.name,
                    "dimension": info.dimension,
                    "max_seq_length": info.max_seq_length,
                    "dtype": info.dtype,
                    "dtype_reason": info.dtype_reason,
                    "pooling": info.pooling,
                    "outputs": sorted(info.outputs),
                }
            )
        if self.memory is not None:
            body["memory"] = self.memory.report()
            body["memory"]["drift"] = self.recalibrator.statistics().report()
        body["speed"] = self.speed()
        return body

    def health(self) -> dict[str, object]:
        status: str = self.status
        if status == "ok" and not self.healthy:
            status = "unhealthy"
        if self.draining:
            status = "draining"
        body: dict[str, object] = {"status": status}
        if self.status == "ok":
            stats = self.scheduler.statistics()
            body["consecutive_failures"] = stats.consecutive_failures
            body["queued_items"] = stats.queued_items
            body["queued_tokens"] = stats.queued_tokens
            body["requests_in_flight"] = self.requests_in_flight
        if self.status == "probing" and self.probe_progress is not None:
            step = self.probe_progress
            body["probe_progress"] = {
                "shape": step.done,
                "of": step.total,
                "seconds": round(step.elapsed_s, 1),
                "estimate_remaining_s": round(step.remaining_s, 1),
            }
        if self.error:
            body["error"] = self.error
        if self.memory is not None:
            body.update(self.memory.report())
        return body


def _pass_meter() -> PeakMeter | None:
    """Served passes are measured where the kernel's high-water mark can be reset (cheap);
    sampling every pass from a thread would cost too much."""
    meter = PeakMeter()
    return meter if meter.method == "vmhwm" else None


def _server_failed() -> ServerFailed:
    """Startup failed for good, or the scheduler crashed: the process is about to exit."""
    return ServerFailed(
        "the server has failed and is shutting down; see its log", code="server_failed"
    )


def _shutting_down() -> ShuttingDown:
    """The process is stopping: another replica (or this one, restarted) will answer."""
    return ShuttingDown(
        "the server is shutting down; retry the request (another replica will answer it)",
        retry_after_s=1,
        code="shutting_down",
    )


def _expected(exc: Exception) -> bool:
    """Startup failures whose message says everything (no stack trace needed)."""
    return isinstance(exc, MemoryTooSmallError | ModelConfigError | OSError)


def _too_slow(exc: TooSlowError) -> TooLarge:
    return TooLarge(
        f"input[{exc.index}] has {exc.tokens} tokens; at this server's measured pace it would "
        f"take about {exc.estimate_s:.0f} s, more than the request deadline of "
        f"{exc.deadline_s:g} s. Send a shorter text (or its parts in separate requests), or "
        "raise BGE_TRIO_REQUEST_TIMEOUT_S",
        param="input",
        code="input_too_slow_for_deadline",
    )


def _merged(
    ids: list[list[int]], windows: list[Windows], results: list[Embedding], timing: Timing
) -> Embedded:
    """One result per input from its windows' results; usage counts every window's tokens."""
    merged = []
    start = 0
    for w in windows:
        merged.append(merge(results[start : start + len(w.token_ids)], w))
        start += len(w.token_ids)
    chunked = any(len(w.token_ids) > 1 for w in windows)
    return Embedded(
        merged,
        [
            list(full) if len(w.token_ids) > 1 else list(w.token_ids[0])
            for full, w in zip(ids, windows, strict=True)
        ],
        timing,
        embedded_tokens=sum(w.tokens for w in windows) if chunked else None,
    )
