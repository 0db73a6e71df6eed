"""The startup probe: measure real forward passes and fit the cost model.

Peak memory is read from the kernel, not estimated: before each forward pass we
hand freed heap pages back to the kernel (``malloc_trim(0)``), reset the process's
resident-set high-water mark by writing ``5`` to ``/proc/self/clear_refs``, run the
pass, and read ``VmHWM`` from ``/proc/self/status``. The peak minus the resident
size at the start is what that shape costs. Where clear_refs cannot be written, a
thread samples the resident size every millisecond instead (it can miss short
spikes, so the status says which method was used).

Shapes are chosen so that several have the same number of tokens B*S at
different S: with B*S fixed, W = B*S*(a + b*S) is a straight line in S, which is
what separates a from b. Every shape is repeated and the largest peak kept; a
first warm-up pass is discarded (it pays one-off allocations).

This runs synchronously in a worker thread while the inference gate is closed,
so no request's forward pass can disturb the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import attrs

from bge_trio.memory.cost import CONSERVATIVE, CostModel, Fit, Point, fit_cost_model

Forward = Callable[[int, int], object]  # runs one (batch, seq) forward pass
Progress = Callable[[int, int, "Point"], None]  # (done, total, point)

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


_libc: ctypes.CDLL | None = None


def malloc_trim() -> None:
    """Give freed heap memory back to the kernel (glibc only; a no-op elsewhere)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
    trim = getattr(_libc, "malloc_trim", None)
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
        malloc_trim()
        if self.method == "vmhwm":
            _CLEAR_REFS.write_text("5")
            baseline = resident_bytes()
            fn()
            peak = _status_kib("VmHWM") * 1024
        else:
            baseline = resident_bytes()
            peak = self._sample_while(fn, baseline)
        return max(0, peak - baseline)

    @staticmethod
    def _sample_while(fn: Callable[[], object], baseline: int) -> int:
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
            fn()
        finally:
            done.set()
            sampler.join()
        return max(peak, resident_bytes())


def probe_shapes(
    max_seq: int,
    workspace: float,
    cost: CostModel = CONSERVATIVE,
    divisors: Sequence[int] = (8, 4, 2, 1),
    min_tokens: int = 4096,
) -> list[tuple[int, int]]:
    """(batch, seq) shapes with equal tokens at different lengths, plus (1, max_seq).

    Every shape of the grid holds ``max(max_seq, min_tokens)`` tokens: enough that
    fixed per-pass allocations do not swamp the per-token cost. A shape the
    conservative model says would not fit the workspace has its batch halved until
    it does, and is skipped if even batch 1 does not fit.
    """
    tokens = max(max_seq, min_tokens)
    shapes: list[tuple[int, int]] = []
    for divisor in divisors:
        seq = max(8, max_seq // divisor)
        batch = max(1, tokens // seq)
        while batch > 1 and cost.predict(batch, seq) > workspace:
            batch //= 2
        if cost.predict(batch, seq) <= workspace and (batch, seq) not in shapes:
            shapes.append((batch, seq))
    if cost.predict(1, max_seq) <= workspace and (1, max_seq) not in shapes:
        shapes.append((1, max_seq))
    return shapes


@attrs.frozen
class ProbeRun:
    """What a probe measured and the fit through it."""

    points: tuple[Point, ...]
    fit: Fit
    method: str
    seconds: float


def run_probe(
    forward: Forward,
    shapes: Sequence[tuple[int, int]],
    *,
    repeats: int = 2,
    meter: PeakMeter | None = None,
    progress: Progress | None = None,
) -> ProbeRun:
    """Measure every shape ``repeats`` times (keeping the max) and fit a and b.

    Raises SingularFitError when the shapes cannot separate the two terms.
    """
    meter = meter or PeakMeter()
    started = time.perf_counter()
    if shapes:
        forward(*shapes[0])  # warm-up: one-off allocations, discarded
    points = []
    for done, (batch, seq) in enumerate(shapes, start=1):
        peak = max(meter.measure(partial(forward, batch, seq)) for _ in range(repeats))
        point = Point(batch, seq, peak)
        points.append(point)
        if progress is not None:
            progress(done, len(shapes), point)
    fit = fit_cost_model(points)
    return ProbeRun(tuple(points), fit, meter.method, time.perf_counter() - started)
