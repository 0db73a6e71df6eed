"""One served model: its encoder, forward threads, scheduler, memory plan and lifecycle.

The engine is what the routes call, in the role of TEI's ``Infer``: ``embed``, ``score``,
``tokens`` and ``decode``, each going down to the scheduler and coming back with its
results and timings, and ``statistics()``, a frozen snapshot of everything it knows
about itself. A request flows one way:

    route → Engine.embed → (tokenise, fit lengths) → Scheduler.submit → queue
          → the scheduler's task → Passes.run → Encoder.forward on a pinned thread
          → results to the request's ticket → back up the same calls

``run`` is the engine's life: load the model, plan its memory (the same two steps as
:func:`~bge_trio.engine.prepare.prepare`), open the scheduler's gate (always, in a
``finally``), then keep confirmed cost-model corrections in the probe cache. Its state
(:mod:`.state`) is one value; waiting for the model is one wait on it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt
import trio

import bge_trio.engine.inputs as inputs
from bge_trio import metrics
from bge_trio.cgroups import CpuLimit
from bge_trio.config import LongInput, Settings
from bge_trio.engine.draining import Draining
from bge_trio.engine.inputs import Embedded
from bge_trio.engine.prepare import LoadEncoder, load_model, plan_serving
from bge_trio.engine.startup import (
    StartupOrder,
    keep_correction,
    log_probe_step,
    pace_seed,
    readiness_check,
    scheduler_for,
)
from bge_trio.engine.state import Failed, Loading, Probing, Ready, State
from bge_trio.errors import invalid, not_ready, server_failed, shutting_down
from bge_trio.memory.plan import (
    MemoryPlan,
    MemoryTooSmallError,
    Planner,
    plan_memory,
)
from bge_trio.memory.probe import ProbeProgress
from bge_trio.model.encoder import (
    SCORE,
    Encoder,
    ModelConfigError,
    ModelInfo,
    Output,
    Token,
    set_threads,
)
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource
from bge_trio.model.transformer import Kind
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.lanes import Lanes
from bge_trio.scheduler.scheduler import Scheduler, SchedulerStatistics
from bge_trio.scheduler.threads import ForwardThreads
from bge_trio.scoring import MODES, Weights, combine, score_matrix

log = logging.getLogger("bge_trio.engine")


@attrs.frozen(eq=False)
class Scored:
    """Score matrices (queries x documents) by mode, the modes used, and tokens embedded."""

    scores: dict[str, npt.NDArray[np.float32]]
    modes: tuple[Output, ...]
    prompt_tokens: int


@attrs.frozen(eq=False)
class Reranked:
    """A cross-encoder's logit for each (query, document) pair, in document order, the
    tokens it read, and where the time went."""

    logits: npt.NDArray[np.float32]
    prompt_tokens: int
    queue_s: float
    inference_s: float


@attrs.frozen
class EmbedRequest:
    """What to embed and how: texts or token id lists, the outputs, the long-input policy
    (None: the server's), and the ``dimensions`` dense vectors are cut to."""

    texts: Sequence[str] | None
    token_ids: Sequence[Sequence[int]] | None
    outputs: frozenset[Output]
    long_input: LongInput | None = None
    dimensions: object = None  # as the request sent it; checked against the model


@attrs.frozen
class EngineStatistics:
    """A snapshot of the engine, for /health, /info and the metrics."""

    name: str
    state: State
    info: ModelInfo | None
    memory: MemoryPlan | None
    scheduler: SchedulerStatistics | None
    lanes: Lanes
    cpu: CpuLimit
    draining: bool
    requests_in_flight: int
    failure_threshold: int
    tokens_per_s_at_512: float | None

    @property
    def healthy(self) -> bool:
        """Ready, not draining, and the last forward passes did not all fail."""
        return (
            isinstance(self.state, Ready)
            and not self.draining
            and self.scheduler is not None
            and self.scheduler.consecutive_failures < self.failure_threshold
        )


class Engine:
    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        lanes: Lanes,
        cpu: CpuLimit,
        *,
        root: Path = Path("/"),
        planner: Planner = plan_memory,
        load: LoadEncoder = load_encoder,
        order: StartupOrder | None = None,
        kind: Kind = "embedding",
    ) -> None:
        self.settings = settings
        self.source = source
        self.lanes = lanes
        self.kind = kind  # known from config.json before the model loads (routing)
        self.name = settings.model_name or source.default_name
        self._cpu = cpu
        self._root = root  # where /proc and /sys are read (tests use a fake tree)
        self._planner = planner
        self._load = load
        self._order = order or StartupOrder(engines=1, forwards=lanes.workers)
        self._threads = ForwardThreads(lanes)
        self._state: State = Loading()
        self._changed = trio.Event()  # replaced on every change of state
        self._encoder: Encoder | None = None
        self._scheduler: Scheduler | None = None
        self._memory: MemoryPlan | None = None
        self._draining = Draining(self.name)
        self._nursery: trio.Nursery | None = None
        self.failed = trio.Event()  # set when serving became impossible for good

    # -- life -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start up, then serve until cancelled (the scheduler runs in here)."""
        send, receive = trio.open_memory_channel[float](math.inf)
        async with self._threads.opened(set_threads), trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._start(nursery, send)
            async with receive:
                async for correction in receive:
                    if self._memory is not None:
                        await keep_correction(self._memory, self.settings, correction)

    async def _start(
        self, nursery: trio.Nursery, corrections: trio.MemorySendChannel[float]
    ) -> None:
        """Load, plan memory, check readiness; the gate opens whatever happens."""
        order, threads, settings = self._order, self._threads, self.settings
        plan = partial(
            plan_serving,
            workers=order.forwards,
            root=self._root,
            planner=self._planner,
            progress=self._probe_step,
        )
        with order.member() as member:
            try:
                encoder = await threads.run_first(
                    partial(
                        load_model,
                        threads=self.lanes.threads,
                        express_threads=self.lanes.express_threads,
                        load=self._load,
                        on_step=self._loading_step,
                        root=self._root,
                    ),
                    settings,
                    self.source,
                )
                await member.arrive_loaded()  # the budget counts every engine's model
                self._encoder = encoder
                self._scheduler = scheduler = scheduler_for(
                    encoder, settings, self._threads, self.name, corrections, order.cores
                )
                await nursery.start(self._supervise, scheduler)
                self._set(Probing())
                async with order.planning():
                    prepared = await threads.run_first(plan, encoder, settings)
                self._memory = prepared.memory
                scheduler.set_policy(prepared.policy)
                scheduler.seed_pace(await pace_seed(threads, encoder, prepared.memory))
                await threads.run_first(readiness_check, encoder)
                _publish_memory_metrics(self.name, prepared.memory)
                # no pass may disturb another engine's probe; one express lane for all
                await member.arrive_planned(_express_reserve(prepared.policy, self.lanes))
                if order.engines > 1:
                    scheduler.set_policy(prepared.policy, order.express_reserve)
                self._set(Ready())
                _log_ready(self.name, prepared.memory)
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                expected = isinstance(exc, MemoryTooSmallError | ModelConfigError | OSError)
                log.critical("startup failed: %s", reason, exc_info=None if expected else exc)
                self._fail(reason)
            finally:
                # Never leave the gate closed: waiting requests must get an answer.
                if self._scheduler is not None:
                    self._scheduler.open()

    async def _supervise(
        self, scheduler: Scheduler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A crashed scheduler would leave every request waiting forever: fail loudly."""
        try:
            await scheduler.run(task_status=task_status)
        except Exception as exc:
            log.critical("the scheduler crashed; the server cannot serve", exc_info=exc)
            self._fail("the scheduler crashed")

    def _set(self, state: State) -> None:
        self._state = state
        self._wake()

    def _wake(self) -> None:
        """Wake every request waiting for the state to change."""
        self._changed.set()
        self._changed = trio.Event()

    def _fail(self, reason: str) -> None:
        """Serving is impossible: keep why, answer what waits, and let the process exit."""
        self._set(Failed(reason))
        if self._scheduler is not None:
            self._scheduler.fail_all(server_failed())  # texts queued during startup
        self.failed.set()

    def _loading_step(self, step: str) -> None:
        """Runs on the forward thread: what loading does now (a conversion takes a while)."""
        self._state = Loading(step)
        log.info("%s: %s", self.name, step)

    def _probe_step(self, step: ProbeProgress) -> None:
        """Runs on the forward thread: the state is one value, replaced whole."""
        self._state = Probing(step)
        log_probe_step(step)

    def begin_shutdown(self, window_s: float) -> None:
        """Drain (see :mod:`.draining`): new work 503, work that ends in ``window_s`` kept."""
        if self._nursery is None:
            return
        self._draining.begin(window_s, self._scheduler, self._nursery)
        self._wake()  # requests waiting for the model get their answer now

    # -- what it knows ----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler, once the model is loaded (for tools and tests that look inside)."""
        return self._scheduler

    @property
    def forward_threads(self) -> ForwardThreads:
        return self._threads

    @property
    def info(self) -> ModelInfo | None:
        """The model's description, once it is loaded."""
        return None if self._encoder is None else self._encoder.info

    def statistics(self) -> EngineStatistics:
        scheduler = self._scheduler
        sample = None if scheduler is None else scheduler.predict_seconds(1, 512)
        return EngineStatistics(
            name=self.name,
            state=self._state,
            info=self.info,
            memory=self._memory,
            scheduler=None if scheduler is None else scheduler.statistics(),
            lanes=self.lanes,
            cpu=self._cpu,
            draining=self._draining.active,
            requests_in_flight=self._draining.requests_in_flight,
            failure_threshold=self.settings.failure_threshold,
            tokens_per_s_at_512=None if sample is None else 512 / sample,
        )

    # -- serving ----------------------------------------------------------------------

    async def loaded(self, deadline: float) -> ModelInfo:
        """The model's description once it is loaded: waits for it until ``deadline``
        (503 ``not_ready`` then); 503 at once when draining or failed."""
        return (await self._loaded(deadline)).info

    async def _loaded(self, deadline: float) -> Encoder:
        with trio.move_on_at(deadline):
            while isinstance(self._state, Loading) and not self._draining.active:
                await self._changed.wait()
        if self._draining.active:
            raise shutting_down()
        if isinstance(self._state, Failed):
            raise server_failed()
        if self._encoder is None:
            raise not_ready(self._state.status)
        return self._encoder

    async def embed(self, request: EmbedRequest, deadline: float) -> Embedded:
        """Embed a request's inputs in input order. Texts wait for the model to load and,
        while its memory is still being measured, for the gate, until ``deadline``."""
        with self._draining.in_flight():
            encoder = await self._loaded(deadline)
            return await self._embed(encoder, request, deadline)

    async def _embed(self, encoder: Encoder, request: EmbedRequest, deadline: float) -> Embedded:
        scheduler = self._scheduler
        if scheduler is None:  # loaded means it exists; a failed start answered above
            raise not_ready(self._state.status)
        info = encoder.info
        dimensions = inputs.check_dimensions(info, request.dimensions)
        inputs.check_outputs(info, request.outputs)
        with scheduler.arriving():  # a batch about to start may wait for these texts
            if request.texts is not None:
                ids = await trio.to_thread.run_sync(encoder.tokenize, request.texts)
            else:
                ids = inputs.check_token_ids(info.vocab_size, request.token_ids or [])
        lengths = inputs.Lengths(
            max_seq=info.max_seq_length,
            fits_memory=scheduler.policy.max_single_length(),
            chunk_window=self.settings.chunk_window,
            chunk_overlap=self.settings.chunk_overlap,
        )
        long_input = request.long_input or self.settings.long_input
        windows = inputs.fit_lengths(encoder, ids, long_input, lengths)
        flat = [list(window) for w in windows for window in w.token_ids]
        served = await scheduler.submit(flat, request.outputs, gate_deadline=deadline)
        embedded = inputs.merged(ids, windows, served.results, served.queue_s, served.inference_s)
        if dimensions is None:
            return embedded
        shortened = [inputs.shortened(e, dimensions) for e in embedded.embeddings]
        return attrs.evolve(embedded, embeddings=shortened)

    async def score(
        self, queries: Sequence[str], documents: Sequence[str], weights: Weights, deadline: float
    ) -> Scored:
        """Embed queries and documents together, then score every pair off the event loop."""
        with self._draining.in_flight():
            encoder = await self._loaded(deadline)
            modes = [mode for mode in MODES if mode in encoder.info.outputs]
            if sum(weights.of(mode) for mode in modes) <= 0:
                raise invalid(
                    f"'weights' must give a positive weight to at least one of: {', '.join(modes)}",
                    param="weights",
                    code="invalid_weights",
                )
            request = EmbedRequest([*queries, *documents], None, frozenset(modes))
            embedded = await self._embed(encoder, request, deadline)
        q, d = embedded.embeddings[: len(queries)], embedded.embeddings[len(queries) :]

        def compute() -> dict[str, npt.NDArray[np.float32]]:
            return combine(score_matrix(q, d, modes), weights)

        return Scored(await trio.to_thread.run_sync(compute), tuple(modes), embedded.prompt_tokens)

    async def rerank(self, query: str, documents: Sequence[str], deadline: float) -> Reranked:
        """A cross-encoder's logit for every (query, document) pair, each pair cut as
        FlagReranker cuts it (:meth:`~bge_trio.model.encoder.Encoder.pair_ids`) and to
        what fits one pass of the memory budget."""
        with self._draining.in_flight():
            encoder = await self._loaded(deadline)
            scheduler = self._scheduler
            if scheduler is None:  # loaded means it exists; a failed start answered above
                raise not_ready(self._state.status)
            inputs.check_outputs(encoder.info, SCORE)
            fits = scheduler.policy.max_single_length()
            with scheduler.arriving():
                ids = await trio.to_thread.run_sync(
                    encoder.pair_ids, query, documents, max(fits, 16)
                )
            served = await scheduler.submit(ids, SCORE, gate_deadline=deadline)
        logits = np.array([result.score for result in served.results], dtype=np.float32)
        tokens = sum(len(pair) for pair in ids)
        return Reranked(logits, tokens, served.queue_s, served.inference_s)

    async def tokens(
        self, texts: Sequence[str], add_special_tokens: bool, deadline: float
    ) -> list[list[Token]]:
        encoder = await self._loaded(deadline)
        return await trio.to_thread.run_sync(encoder.tokens, texts, add_special_tokens)

    async def decode(
        self, token_ids: Sequence[Sequence[int]], skip_special_tokens: bool, deadline: float
    ) -> list[str]:
        encoder = await self._loaded(deadline)
        checked = inputs.check_token_ids(encoder.info.vocab_size, token_ids, param="ids")
        return await trio.to_thread.run_sync(encoder.decode, checked, skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's pieces for ``ids`` (the model is loaded: a request was served)."""
        if self._encoder is None:
            raise not_ready(self._state.status)
        return self._encoder.tokenizer.pieces(ids)


def _express_reserve(policy: BatchPolicy, lanes: Lanes) -> float:
    """The bytes this model's worst express pass needs (0: no express lane)."""
    return policy.cost.predict(1, lanes.express_tokens) if lanes.express else 0.0


def _log_ready(model: str, memory: MemoryPlan) -> None:
    log.info(
        "ready: model %s, probe %s, a=%.0f b=%.2f c=%.0f, budget %d bytes per forward",
        model,
        memory.status,
        memory.cost.a,
        memory.cost.b,
        memory.cost.c,
        memory.budget.workspace_bytes,
    )


def _publish_memory_metrics(model: str, plan: MemoryPlan) -> None:
    for status in ("running", "complete", "failed", "cache_hit", "disabled"):
        metrics.PROBE_STATUS.labels(model, status).set(1 if status == plan.status else 0)
    metrics.COST_A.labels(model).set(plan.cost.a)
    metrics.COST_B.labels(model).set(plan.cost.b)
    metrics.COST_C.labels(model).set(plan.cost.c)
    metrics.MEMORY_LIMIT.labels(model).set(plan.budget.limit.bytes)
    metrics.FORWARD_BUDGET.labels(model).set(plan.budget.workspace_bytes)
