"""From a loaded model to a memory plan: budget, cost model, and how it was obtained.

Order of precedence for the cost model: explicit ``BGE_TRIO_COST_A``/``_B``
(status ``disabled``); ``BGE_TRIO_PROBE=off`` (the conservative model, status
``disabled``); a cache hit (``cache_hit``, unless ``force``); a fresh probe
(``complete``); and when the probe fails, the conservative model (``failed``).
The probe runs under a host-wide file lock so that sibling processes started
together (hypercorn ``--workers N``) wait for one probe and reuse its result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import numpy as np
import torch

from bge_trio import __version__
from bge_trio.config import Settings
from bge_trio.memory.allocator import start_tunables
from bge_trio.memory.budget import Budget, detect_memory_limit
from bge_trio.memory.cache import (
    CacheKey,
    ProbeCache,
    cpu_identity,
    make_key,
    model_identity,
)
from bge_trio.memory.cost import CONSERVATIVE, CostModel, Point
from bge_trio.memory.probe import (
    PeakMeter,
    Progress,
    malloc_trim,
    probe_shapes,
    resident_bytes,
    run_probe,
)
from bge_trio.model.encoder import Encoder
from bge_trio.model.transformer import implementation

log = logging.getLogger(__name__)

# The probe measures a two-layer copy of the model (see Encoder.shallow): the same peak
# as the full depth, at a fraction of the time.
PROBE_LAYERS = 2

ProbeStatus = Literal["running", "complete", "failed", "cache_hit", "disabled"]


class Planner(Protocol):
    """Decides the cost model for a loaded encoder (``plan_memory``, or a test's stand-in)."""

    def __call__(
        self, encoder: Encoder, settings: Settings, budget: Budget, *, progress: Progress | None
    ) -> MemoryPlan: ...


class MemoryTooSmallError(RuntimeError):
    """Not even one text of the maximum length fits the per-forward workspace."""


@attrs.frozen
class MemoryPlan:
    status: ProbeStatus
    cost: CostModel
    budget: Budget
    points: tuple[Point, ...] = ()
    method: str | None = None
    probe_seconds: float | None = None
    detail: str | None = None
    cache_key: CacheKey | None = None  # where a confirmed correction is kept
    # (batch, seq, seconds at full depth) of the probe's passes: a first pace estimate
    pass_seconds: tuple[tuple[int, int, float], ...] = ()

    @property
    def residuals(self) -> list[float]:
        return [p.peak_bytes - self.cost.predict(p.batch, p.seq) for p in self.points]

    def report(self) -> dict[str, Any]:
        """The numbers /health and /info show."""
        b = self.budget
        worst = b.processes * b.model_resident_bytes + b.concurrent_forwards * b.workspace_bytes
        return {
            "probe_status": self.status,
            "probe_method": self.method,
            "probe_seconds": self.probe_seconds,
            "probe_detail": self.detail,
            "cost_a_bytes_per_token": self.cost.a,
            "cost_b_bytes_per_token2": self.cost.b,
            "cost_c_bytes_per_pass": self.cost.c,
            "measured_points": len(self.points),
            "memory_limit_bytes": b.limit.bytes,
            "memory_limit_source": b.limit.source,
            "model_resident_bytes": b.model_resident_bytes,
            "resident_weights_bytes": b.weights_bytes,
            "resident_runtime_bytes": b.runtime_bytes,
            "per_forward_budget_bytes": b.workspace_bytes,
            "concurrent_forwards": b.concurrent_forwards,
            "worst_case_peak_share": round(worst / b.limit.bytes, 4) if b.limit.bytes else None,
        }


def cache_key_for(encoder: Encoder, settings: Settings) -> dict[str, str | int]:
    info = encoder.info
    key: dict[str, str | int] = {
        "package": __version__,
        "model": model_identity(info.source),
        "dtype": info.dtype,
        "allocator": settings.allocator,
        "tunables": start_tunables(),
        "max_seq": info.max_seq_length,
        "torch": torch.__version__,
        "cpu": cpu_identity(),
        "threads": torch.get_num_threads(),
    }
    if encoder.compiled is not None:  # the backend that serves is the one measured
        key["backend"] = f"{encoder.backend} {encoder.compiled.version}"
    elif encoder.model is not None:
        key["transformer"] = implementation(encoder.model)
    return key


def synthetic_forward(encoder: Encoder) -> Callable[[int, int], object]:
    """A forward pass over random token ids of a given shape, with every output the model has."""
    rng = np.random.default_rng(0)
    vocab = encoder.info.vocab_size
    low = min(10, vocab - 1)
    outputs = encoder.info.outputs

    def forward(batch: int, seq: int) -> object:
        ids = rng.integers(low, vocab, size=(batch, seq)).tolist()
        if batch > 1:  # real batches are padded: make the attention mask non-trivial
            ids[-1] = ids[-1][:-1]
        return encoder.forward(ids, outputs)

    return forward


def time_passes(encoder: Encoder) -> tuple[tuple[int, int, float], ...]:
    """(batch, seq, seconds) of three small full-depth passes: a first pace where the probe
    timed none (probe off, an explicit cost model, a failed probe), so that admission
    never judges the first requests blind. Each shape runs twice; the faster counts."""
    forward = synthetic_forward(encoder)
    longest = min(512, encoder.info.max_seq_length)
    short = max(1, min(32, longest // 4))
    timed = []
    for batch, seq in ((1, short), (8, short), (1, longest)):
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            forward(batch, seq)
            seconds.append(time.perf_counter() - started)
        timed.append((batch, seq, min(seconds)))
    return tuple(timed)


def measure_budget(
    encoder: Encoder, settings: Settings, root: Path = Path("/"), *, workers: int | None = None
) -> Budget:
    """Make every weight resident, warm up, hand freed memory back, size the workspace.

    The resident size is read after every weight has been copied into memory, a warm-up
    pass and ``malloc_trim``: it counts all the weights (also pages of a 250k-token
    vocabulary that traffic would otherwise fault in later), the tokenizer and the
    runtime, and everything a pass keeps, but not a pass's transient peak.
    """
    weights = encoder.make_weights_resident()
    encoder.forward(encoder.tokenize(["warm-up"]), encoder.info.outputs)
    malloc_trim()
    return Budget(
        detect_memory_limit(root, settings.memory_limit_bytes),
        resident_bytes(),
        settings.memory_headroom_bytes,
        settings.memory_safety,
        workers or settings.workers or 1,
        settings.processes,
        weights_bytes=weights,
    )


def plan_memory(
    encoder: Encoder,
    settings: Settings,
    budget: Budget,
    *,
    progress: Progress | None = None,
    meter: PeakMeter | None = None,
) -> MemoryPlan:
    """Decide the cost model (synchronous; run it off the event loop)."""
    if settings.cost_a is not None and settings.cost_b is not None:
        plan = MemoryPlan(
            "disabled",
            CostModel(settings.cost_a, settings.cost_b, settings.cost_c),
            budget,
            detail="BGE_TRIO_COST_A/B set",
        )
    elif settings.probe == "off":
        plan = MemoryPlan("disabled", CONSERVATIVE, budget, detail="BGE_TRIO_PROBE=off")
    else:
        plan = _probe_or_cache(encoder, settings, budget, progress, meter)
    return plan


def _probe_or_cache(
    encoder: Encoder,
    settings: Settings,
    budget: Budget,
    progress: Progress | None,
    meter: PeakMeter | None,
) -> MemoryPlan:
    cache = ProbeCache(settings.cache_dir)
    key = make_key(**cache_key_for(encoder, settings))

    def probe() -> MemoryPlan:
        shapes = probe_shapes(encoder.info.max_seq_length, budget.workspace_bytes)
        if len(shapes) < 2:
            raise ValueError(
                f"only {len(shapes)} probe shape(s) fit the per-forward budget of "
                f"{budget.workspace_bytes} bytes"
            )
        with encoder.shallow(PROBE_LAYERS) as depth:
            run = run_probe(synthetic_forward(encoder), shapes, meter=meter, progress=progress)
        # Layers dominate a pass's time; scaling a shallow pass to full depth slightly
        # overstates the embeddings' and heads' part, which errs towards refusing.
        scale = max(1, encoder.layers) / max(1, depth)
        timed = tuple(
            (p.batch, p.seq, seconds * scale)
            for p, seconds in zip(run.points, run.pass_seconds, strict=True)
        )
        return MemoryPlan(
            "complete",
            run.fit.model,
            budget,
            run.points,
            run.method,
            run.seconds,
            pass_seconds=timed,
        )

    try:
        with cache.probe_lock(key):
            if settings.probe == "auto":
                hit = cache.load(key)
                if hit is not None:
                    log.info("probe cache hit: %s", cache.path_for(key))
                    return MemoryPlan(
                        "cache_hit",
                        hit.model,
                        budget,
                        hit.points,
                        hit.method,
                        cache_key=key,
                        pass_seconds=hit.pass_seconds,
                    )
            plan = _failsafe(probe, budget)
            if plan.status == "complete":
                plan = attrs.evolve(plan, cache_key=key)
                try:
                    path = cache.store(
                        key, plan.cost, plan.points, plan.method or "", plan.pass_seconds
                    )
                    log.info("probe result cached in %s", path)
                except OSError as exc:  # keep the result; only the next start pays again
                    log.warning("could not write the probe cache (%s)", exc)
            return plan
    except OSError as exc:  # no lock, so no cache directory: probe without it
        log.warning("probe cache at %s unusable (%s); probing without it", cache.directory, exc)
        return _failsafe(probe, budget)


def store_correction(plan: MemoryPlan, settings: Settings, correction: float) -> Path | None:
    """Keep a confirmed recalibration in the probe cache, so the next start begins with it.

    Only for plans that came from the cache or a probe (an explicit model is the
    operator's). Synchronous file I/O: call it from a worker thread.
    """
    if plan.cache_key is None:
        return None
    cache = ProbeCache(settings.cache_dir)
    corrected = plan.cost.scaled(correction)
    return cache.store(plan.cache_key, corrected, plan.points, "recalibrated", plan.pass_seconds)


def _failsafe(probe: Callable[[], MemoryPlan], budget: Budget) -> MemoryPlan:
    try:
        return probe()
    except Exception as exc:
        log.exception("memory probe failed; using the conservative cost model")
        return MemoryPlan("failed", CONSERVATIVE, budget, detail=f"{type(exc).__name__}: {exc}")


def check_fits(plan: MemoryPlan, max_seq: int) -> None:
    """Refuse to start when one text of the maximum length cannot fit."""
    need = plan.cost.predict(1, max_seq)
    budget = plan.budget
    if need <= budget.workspace_bytes:
        return
    longest = plan.cost.max_seq_within(budget.workspace_bytes)
    raise MemoryTooSmallError(
        f"memory limit {budget.limit.bytes} bytes ({budget.limit.source}) is too small: "
        f"one text of {max_seq} tokens needs {need:.0f} bytes per forward pass "
        f"(a={plan.cost.a:.0f}, b={plan.cost.b:.2f}, c={plan.cost.c:.0f}) "
        f"but the per-forward budget is {budget.workspace_bytes} bytes "
        f"after {budget.processes} x {budget.model_resident_bytes} bytes of model, "
        f"{budget.headroom_bytes} bytes headroom, safety {budget.safety} and "
        f"{budget.concurrent_forwards} concurrent forward passes. Raise the limit to at least "
        f"{budget.limit_needed_for(need)} bytes, or set BGE_TRIO_MAX_SEQ_LENGTH <= {longest}, "
        "or lower BGE_TRIO_WORKERS."
    )
