"""Online recalibration: every served pass's measured peak against its prediction.

The probe measures a few shapes once; traffic brings every other shape, for hours.
When a served pass peaks above what the cost model predicted for it (a model cached
on other hardware, an allocator that behaves differently under load, a shape far
from the probed ones), the model is wrong in the unsafe direction. The recalibrator
keeps a correction factor, the worst measured/predicted ratio seen so far, which
multiplies the cost model for every pass planned after it: the workspace a batch
may use shrinks at once. A correction seen on ``confirm`` passes is confirmed and
worth keeping in the probe cache, so the next start begins corrected.

Only passes that ran alone are measured (the kernel's high-water mark is per
process), and the correction never goes down: it errs on the safe side.
"""

from __future__ import annotations

import threading

import attrs


@attrs.frozen
class Overrun:
    """One pass that peaked above its prediction."""

    batch: int
    seq: int
    measured_bytes: int
    predicted_bytes: float

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.predicted_bytes if self.predicted_bytes else 0.0


@attrs.frozen
class Drift:
    """A snapshot of what the served passes said about the cost model (for /info)."""

    passes_measured: int
    passes_over: int
    correction: float  # multiplies the cost model; 1.0 until a pass overran
    worst_ratio: float  # largest measured / predicted seen (also under 1)
    confirmed: bool
    last_overrun: Overrun | None

    def report(self) -> dict[str, object]:
        last = self.last_overrun
        return {
            "passes_measured": self.passes_measured,
            "passes_over_prediction": self.passes_over,
            "correction": round(self.correction, 4),
            "worst_measured_over_predicted": round(self.worst_ratio, 4),
            "confirmed": self.confirmed,
            "last_overrun": None
            if last is None
            else {
                "batch": last.batch,
                "seq": last.seq,
                "measured_bytes": last.measured_bytes,
                "predicted_bytes": round(last.predicted_bytes),
            },
        }


class Recalibrator:
    """Compares measured peaks with predictions; raises the correction on an overrun."""

    def __init__(self, *, tolerance: float = 0.02, confirm: int = 2) -> None:
        self._tolerance = tolerance  # measurement noise that is not drift
        self._confirm = confirm
        self._lock = threading.Lock()
        self._measured = 0
        self._over = 0
        self._correction = 1.0
        self._worst = 0.0
        self._last: Overrun | None = None

    @property
    def correction(self) -> float:
        return self._correction

    def observe(self, batch: int, seq: int, measured: int, predicted: float) -> Overrun | None:
        """Record one pass; returns the overrun when it raised the correction.

        ``predicted`` is what the corrected model predicted, so the new correction is
        the old one times this pass's ratio.
        """
        if predicted <= 0:
            return None
        with self._lock:
            self._measured += 1
            ratio = measured / predicted
            self._worst = max(self._worst, ratio * self._correction)
            if ratio <= 1.0 + self._tolerance:
                return None
            self._over += 1
            self._correction *= ratio
            self._last = Overrun(batch, seq, measured, predicted)
            return self._last

    def statistics(self) -> Drift:
        with self._lock:
            return Drift(
                self._measured,
                self._over,
                self._correction,
                self._worst,
                self._over >= self._confirm,
                self._last,
            )
