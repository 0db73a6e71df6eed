"""The embedding service: what the HTTP routes call.

It owns the gate, the scheduler and the startup sequence (:mod:`.startup`), and
turns texts or token ids into embeddings and scores under every rule the server
promises (:mod:`.inputs`): the maximum sequence length, the long-input policy, the
memory budget, and a clear error for each way a request can be refused
(:mod:`.refusals`).

Shutdown (``begin_shutdown``, when the process is told to stop) drains
(:mod:`.draining`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import trio

from bge_trio import metrics
from bge_trio.cgroups import CpuLimit, detect_cpu_limit
from bge_trio.config import LongInput, Settings
from bge_trio.errors import NotReady, invalid
from bge_trio.memory.plan import MemoryPlan, Planner, plan_memory
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import (
    BetweenLayers,
    Embedding,
    Encoder,
    ModelInfo,
    Output,
    Token,
)
from bge_trio.model.source import ModelSource
from bge_trio.scheduler.gate import Gate
from bge_trio.scheduler.lanes import Lanes, plan_lanes
from bge_trio.scheduler.scheduler import Scheduler, Timing, unlimited_policy
from bge_trio.scheduler.threads import ForwardThreads
from bge_trio.scoring import MODES, Weights, combine, score_matrix
from bge_trio.service import inputs, reports
from bge_trio.service.draining import Draining
from bge_trio.service.inputs import Embedded
from bge_trio.service.refusals import refusal, server_failed, shutting_down
from bge_trio.service.startup import Startup, Status

log = logging.getLogger("bge_trio.service")


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
        self.cpu: CpuLimit = detect_cpu_limit(root)
        self.lanes: Lanes = plan_lanes(self.cpu.threads, settings.workers, settings.express_tokens)
        self.gate = Gate(self.lanes.workers)
        self.forward_threads = ForwardThreads(self.lanes)
        self.scheduler = Scheduler(
            self._forward,
            self.gate,
            unlimited_policy(),
            lanes=self.lanes,
            forward_threads=self.forward_threads,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_queue_items=settings.max_queue_items,
            max_queue_tokens=settings.max_queue_tokens,
            max_wait_s=settings.request_timeout_s,
            observer=metrics.SchedulerMetrics(),
            meter=_pass_meter(),
            on_peak=self._pass_peaked,
        )
        self.startup = Startup(
            settings,
            source,
            self.scheduler,
            self.forward_threads,
            self.gate,
            root=root,
            planner=planner,
            load_encoder=load_encoder,
        )
        self._nursery: trio.Nursery | None = None
        self._draining = Draining(self.scheduler, self.startup.settled)

    # -- what startup found -------------------------------------------------------------

    @property
    def status(self) -> Status:
        return self.startup.status

    @property
    def encoder(self) -> Encoder | None:
        return self.startup.encoder

    @property
    def memory(self) -> MemoryPlan | None:
        return self.startup.memory

    @property
    def failed(self) -> trio.Event:
        return self.startup.failed

    @property
    def draining(self) -> bool:
        return self._draining.active

    @property
    def requests_in_flight(self) -> int:
        return self._draining.requests_in_flight

    @property
    def info(self) -> ModelInfo:
        return self.startup.require_encoder().info

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler and the startup sequence until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._supervise_scheduler)
            task_status.started()
            await self.startup.run(nursery)

    async def start(self) -> None:
        """The startup sequence alone (for tools that run it without serving)."""
        await self.startup.run()

    async def _supervise_scheduler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A crashed scheduler would leave every request waiting forever: fail loudly instead."""
        try:
            await self.scheduler.run(task_status=task_status)
        except Exception as exc:
            log.critical("the scheduler crashed; the server cannot serve", exc_info=exc)
            self.startup.fail("the scheduler crashed", exc)

    def _pass_peaked(self, batch: int, seq: int, peak: int) -> None:
        self.startup.pass_peaked(batch, seq, peak)

    def begin_shutdown(self, window_s: float) -> None:
        """Drain (see :mod:`.draining`): new work 503, work that ends in ``window_s`` kept."""
        self._draining.begin(window_s, self._nursery)

    # -- serving ------------------------------------------------------------------------

    def _forward(
        self,
        batch: Sequence[Sequence[int]],
        outputs: frozenset[Output],
        between_layers: BetweenLayers | None = None,
    ) -> list[Embedding]:
        return self.startup.require_encoder().forward(batch, outputs, between_layers)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        tokenizer = self.startup.require_encoder().tokenizer
        return list(tokenizer.convert_ids_to_tokens(list(ids)))

    async def ready(self, arrived: float | None = None) -> Encoder:
        """Wait (up to the startup wait from ``arrived``) for the model; 503 if not loaded.

        The model is needed to validate and tokenise a request. Its forward passes may
        still wait at the closed gate while the probe runs (see ``_submit``).
        """
        startup = self.startup
        if startup.encoder is None and startup.status != "error":
            start = trio.current_time() if arrived is None else arrived
            with trio.move_on_at(start + self.settings.startup_wait_s):
                await startup.settled.wait()
        if self.draining:
            raise shutting_down()
        if startup.status == "error":
            raise server_failed()
        if startup.encoder is None:
            raise NotReady(
                f"the model is still {startup.status}; retry shortly",
                retry_after_s=5,
                code="not_ready",
            )
        return startup.encoder

    async def _submit(
        self, ids: list[list[int]], outputs: frozenset[Output], arrived: float, timing: Timing
    ) -> list[Embedding]:
        """Queue the texts; while the gate is still closed, give up at the startup wait."""
        with self.gate.until(arrived + self.settings.startup_wait_s) as waited:
            try:
                return await self.scheduler.submit(ids, outputs, timing)
            except Exception as exc:
                answer = refusal(exc, failed=self.startup.status == "error")
                if answer is None:
                    raise
                raise answer from None
        assert waited.cancelled_caught
        raise NotReady(
            f"the server is still {self.status}; retry shortly", retry_after_s=5, code="not_ready"
        )

    @property
    def healthy(self) -> bool:
        """Ready, not draining, and the last forward passes did not all fail."""
        return (
            self.startup.status == "ok"
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
        with self._draining.in_flight():
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
        inputs.check_outputs(encoder, outputs)
        with self.scheduler.arriving():  # a batch about to start may wait for these texts
            if texts is not None:
                ids = await trio.to_thread.run_sync(encoder.tokenize, texts)
            else:
                ids = inputs.check_token_ids(encoder.info.vocab_size, token_ids or [])
        windows = inputs.fit_lengths(
            encoder, ids, long_input or self.settings.long_input, self._lengths(encoder)
        )
        flat = [list(window) for w in windows for window in w.token_ids]
        timing = Timing()
        results = await self._submit(flat, outputs, arrived, timing)
        return inputs.merged(ids, windows, results, timing)

    def _lengths(self, encoder: Encoder) -> inputs.Lengths:
        return inputs.Lengths(
            max_seq=encoder.info.max_seq_length,
            fits_memory=self.scheduler.policy.max_single_length(),
            chunk_window=self.settings.chunk_window,
            chunk_overlap=self.settings.chunk_overlap,
        )

    async def score(
        self, queries: Sequence[str], documents: Sequence[str], weights: Weights
    ) -> Scored:
        """Embed queries and documents together, then score every pair off the event loop."""
        with self._draining.in_flight():
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
        checked = inputs.check_token_ids(encoder.info.vocab_size, token_ids, param="ids")
        return await trio.to_thread.run_sync(encoder.decode, checked, skip_special_tokens)

    # -- what it says about itself ------------------------------------------------------

    def health(self) -> dict[str, object]:
        return reports.health(self)

    def describe(self) -> dict[str, Any]:
        return reports.describe(self)


def _pass_meter() -> PeakMeter | None:
    """Served passes are measured where the kernel's high-water mark can be reset (cheap);
    sampling every pass from a thread would cost too much."""
    meter = PeakMeter()
    return meter if meter.method == "vmhwm" else None
