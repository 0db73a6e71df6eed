"""The startup probe: measure real forward passes and fit the cost model.

Peak memory is read from the kernel, not estimated: before each forward pass we
hand freed heap pages back to the kernel (``malloc_trim(0)``), reset the process's
resident-set high-water mark by writing ``5`` to ``/proc/self/clear_refs``, run the
pass, and read ``VmHWM`` from ``/proc/self/status``. The peak minus the resident
size at the start is what that shape costs. Where clear_refs cannot be written, a
thread samples the resident size every millisecond instead (it can miss short
spikes, so the status says which method was used).

Shapes are chosen so that two have the same number of tokens B*S at different S
(which separates the per-token from the per-token² term) and another has fewer
tokens (which separates the per-pass constant). A first warm-up pass is discarded
(it pays one-off allocations).

This runs synchronously on the forward thread while the inference gate is closed,
so no request's forward pass can disturb the measurements. The caller may run it
on a depth-truncated model (see ``Encoder.shallow``): a pass frees each layer's
intermediates before the next layer runs, so its peak is set by one layer at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs

from bge_trio.memory.allocator import libc
from bge_trio.memory.cost import CONSERVATIVE, CostModel, Fit, Point, fit_cost_model

T = TypeVar("T")
Forward = Callable[[int, int], object]  # runs one (batch, seq) forward pass
Progress = Callable[["ProbeProgress"], None]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} missing from {_STATUS}")


def resident_bytes() -> int:
    """This process's resident set size now."""
    return _status_kib("VmRSS") * 1024


def malloc_trim() -> None:
    """Give freed heap memory back to the kernel (glibc only; a no-op elsewhere)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _can_reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


class PeakMeter:
    """Measures the peak resident memory a callable adds above the resident size before it."""

    def __init__(self, method: str | None = None) -> None:
        self.method = method or ("vmhwm" if _can_reset_hwm() else "sampling")

    def measure(self, fn: Callable[[], object]) -> int:
        return self.measure_call(fn)[1]

    def measure_call(self, fn: Callable[[], T], *, trim: bool = True) -> tuple[T, int]:
        """Run ``fn``; its result and the peak bytes it added above the resident size before.

        ``trim`` first hands freed heap back to the kernel, for a clean baseline.
        """
        if trim:
            malloc_trim()
        if self.method == "vmhwm":
            _CLEAR_REFS.write_text("5")
            baseline = resident_bytes()
            result = fn()
            peak = _status_kib("VmHWM") * 1024
        else:
            baseline = resident_bytes()
            result, peak = self._sample_while(fn, baseline)
        return result, max(0, peak - baseline)

    def measure_pass(self, fn: Callable[[], T]) -> tuple[T, int]:
        """A served pass: its result and peak, measured as the probe measures, then trimmed.

        Tensors of 1 MiB and more are unmapped when freed (the predictable allocator),
        but a pass also makes many smaller ones (per-head pieces of short texts), and so
        does request handling; the heap keeps their pages and the next pass reuses them.
        Trimming before the pass gives the probe's baseline (so measured and predicted
        peaks compare), and trimming after keeps the process at the resident size the
        budget counts between passes.
        """
        try:
            return self.measure_call(fn, trim=True)
        finally:
            malloc_trim()

    @staticmethod
    def _sample_while(fn: Callable[[], T], baseline: int) -> tuple[T, int]:
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, resident_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = fn()
        finally:
            done.set()
            sampler.join()
        return result, max(peak, resident_bytes())


def probe_shapes(
    max_seq: int,
    workspace: float,
    cost: CostModel = CONSERVATIVE,
    min_tokens: int = 4096,
) -> list[tuple[int, int]]:
    """Four (batch, seq) shapes that separate the three terms of the cost model.

    Three shapes of the same ``T = max(max_seq, min_tokens)`` tokens at S = max_seq,
    max_seq/4 and max_seq/16 (the same tokens at other lengths tell the per-token²
    term from the per-token one, and the longest length is measured), and one of another
    token count at S = max_seq/16 (it tells the per-pass constant from the rest; short
    texts keep it cheap): T/2 where that is still ``min_tokens`` or more, else 2·T.
    Batches of more than one text are padded, as real batches are.

    Every shape has thousands of tokens. Small passes cost more per token than large
    ones (the matrix kernels pick other algorithms for few rows: ``benchmarks.form``'s
    passes of growing size, all-MiniLM-L6-v2 at about 13 KB per token up to 1,024
    tokens and 8.4 from 2,048 up in bf16). A small shape in the fit would be read as a
    per-token² or per-pass cost that over-predicts every large pass by tens of percent
    (or, as the second token count, one that under-predicts them), and the large passes
    are the ones the budget is about. At BGE-M3's 8,192 tokens the longest shape is one
    text (one text costs what a padded batch of the same tokens does there), which keeps
    the probe's slowest pass (attention over 8,192 positions) to one text. A shape the
    conservative model says might not fit the workspace has its batch halved until it
    does, and is skipped if even batch 1 does not fit.
    """
    tokens = max(max_seq, min_tokens)
    lengths = [max_seq, max(8, max_seq // 4), max(8, max_seq // 16)]
    wanted = [(tokens // seq, seq) for seq in lengths]
    other = tokens // 2 if tokens // 2 >= min_tokens else 2 * tokens
    wanted.append((other // lengths[-1], lengths[-1]))
    shapes: list[tuple[int, int]] = []
    for batch, seq in wanted:
        batch = max(1, batch)
        while batch > 1 and cost.predict(batch, seq) > workspace:
            batch //= 2
        if cost.predict(batch, seq) <= workspace and (batch, seq) not in shapes:
            shapes.append((batch, seq))
    return shapes


@attrs.frozen
class ProbeProgress:
    """Where a running probe is: shape ``done`` of ``total``, and the time so far and to go."""

    done: int
    total: int
    point: Point
    elapsed_s: float
    remaining_s: float


@attrs.frozen
class ProbeRun:
    """What a probe measured and the fit through it."""

    points: tuple[Point, ...]
    fit: Fit
    method: str
    seconds: float
    pass_seconds: tuple[float, ...] = ()  # each point's fastest measured pass


def _warm_up_shape(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most tokens at the shortest length: the first large pass of a process pays
    one-off allocations (``benchmarks.form`` measures it), and short texts keep the
    warm-up's attention cheap (BGE-M3 in bf16, two layers: 2.5 s for 16 x 512 against
    16 s for 2 x 8192)."""
    most = max(batch * seq for batch, seq in shapes)
    seq = min(seq for _, seq in shapes)
    return max(1, most // seq), seq


def _work(batch: int, seq: int) -> float:
    """Relative time of a pass: per token, plus attention that grows with S (for estimates)."""
    return batch * seq * (1.0 + seq / 4096)


def run_probe(
    forward: Forward,
    shapes: Sequence[tuple[int, int]],
    *,
    repeats: int = 1,
    meter: PeakMeter | None = None,
    progress: Progress | None = None,
) -> ProbeRun:
    """Measure every shape ``repeats`` times (keeping the max) and fit the cost model.

    One warm-up pass first pays the one-off allocations. With the
    weights resident and the predictable allocator, a shape peaks within 1 % of the
    same size every time, so one measurement each is enough; the first run of a shape
    is also its largest, which is the one kept.

    Raises SingularFitError when the shapes cannot separate the terms.
    """
    meter = meter or PeakMeter()
    started = time.perf_counter()
    if shapes:
        forward(*_warm_up_shape(shapes))
    total_work = sum(_work(*shape) for shape in shapes)
    done_work = 0.0
    points = []
    timings = []
    for done, (batch, seq) in enumerate(shapes, start=1):
        peaks, times = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            peaks.append(meter.measure(partial(forward, batch, seq)))
            times.append(time.perf_counter() - began)
        point = Point(batch, seq, max(peaks))
        points.append(point)
        timings.append(min(times))
        done_work += _work(batch, seq)
        if progress is not None:
            elapsed = time.perf_counter() - started
            remaining = elapsed * (total_work - done_work) / done_work if done_work else 0.0
            progress(ProbeProgress(done, len(shapes), point, elapsed, remaining))
    fit = fit_cost_model(points)
    return ProbeRun(tuple(points), fit, meter.method, time.perf_counter() - started, tuple(timings))
