"""How long a forward pass takes, learnt from the passes the server runs.

A pass costs a fixed part (Python and framework overhead per layer, reading the
weights), a part per padded token, and attention, whose work per token grows with
the sequence length::

    T ≈ t0 + t1·B·S + t2·B·S²

The ratio ``overhead_tokens = t0 / t1`` says how many padded tokens one extra pass
is worth, which is what the batch planner needs to decide whether a short text
should ride along, padded, with long ones, or wait for a pass of its own. The
whole curve is what admission needs to tell, before an 8,000-token text runs,
whether it can finish within its deadline: per token, such a text costs several
times what a 256-token passage does, so a per-token rate learnt from short texts
would promise far too much.

The fit is an exponentially weighted least-squares fit through the recent passes,
so it follows the machine's real speed (threads, contention, dtype). The memory
probe's timed passes can seed it (:meth:`seed`), so the first long text is judged
before any has run. While the passes do not vary enough to separate the terms, the
S² term is left out; without a line at all, ``overhead_tokens`` is ``prior_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
import numpy as np
import numpy.typing as npt

# Feature scales keep the normal equations well conditioned (B·S up to ~1e5, B·S² ~1e9).
_X_SCALE = 1e3
_Q_SCALE = 1e6


@attrs.define
class PassPace:
    prior_tokens: float = 32.0
    decay: float = 0.98  # weight of the past per observation (~50 passes of memory)
    min_passes: int = 8
    max_tokens: float = 4096.0
    passes: int = 0
    _gram: npt.NDArray[np.float64] = attrs.field(factory=lambda: np.zeros((3, 3)))
    _moment: npt.NDArray[np.float64] = attrs.field(factory=lambda: np.zeros(3))

    def observe(
        self, padded_tokens: int, seconds: float, *, seq: int = 0, weight: float = 1.0
    ) -> None:
        """Record one finished pass of ``padded_tokens`` (B·S), padded to ``seq`` (S)."""
        if padded_tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        f = np.array([1.0, padded_tokens / _X_SCALE, padded_tokens * seq / _Q_SCALE])
        self._gram = self.decay * self._gram + weight * np.outer(f, f)
        self._moment = self.decay * self._moment + weight * f * seconds
        self.passes += 1

    def seed(self, passes: Iterable[tuple[int, int, float]]) -> None:
        """Start afresh from (batch, seq, seconds) passes timed elsewhere, e.g. by the probe.

        The probe spreads its shapes on purpose, so three different shapes are enough
        to fit: the curve is known before the first request (served passes refine it).
        """
        self._gram = np.zeros((3, 3))
        self._moment = np.zeros(3)
        self.passes = 0
        shapes = set()
        for batch, seq, seconds in passes:
            self.observe(batch * seq, seconds, seq=seq)
            shapes.add((batch, seq))
        if len(shapes) >= 3:
            self.passes = max(self.passes, self.min_passes)

    def curve(self) -> tuple[float, float, float] | None:
        """(t0 s, t1 s per padded token, t2 s per padded token per token of length)."""
        if self.passes < self.min_passes:
            return None
        full = self._solve(3)
        if full is not None and full[1] > 0 and full[2] > 0:
            return max(0.0, full[0]), full[1], full[2]
        line = self._solve(2)
        if line is not None and line[1] > 0:
            return max(0.0, line[0]), line[1], 0.0
        return None

    def _solve(self, terms: int) -> tuple[float, float, float] | None:
        gram, moment = self._gram[:terms, :terms], self._moment[:terms]
        weight = gram[0, 0]
        if weight <= 0:
            return None
        # Too little spread in a term's feature (relative to its mean): it cannot be seen.
        for k in range(1, terms):
            mean = gram[0, k] / weight
            variance = gram[k, k] / weight - mean * mean
            if variance <= (0.1 * mean) ** 2:
                return None
        try:
            coef = np.linalg.solve(gram, moment)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(coef)):
            return None
        padded = [*coef.tolist(), 0.0, 0.0][:3]
        return padded[0], padded[1] / _X_SCALE, padded[2] / _Q_SCALE

    def line(self) -> tuple[float, float] | None:
        """(t0 seconds, t1 seconds per padded token), or None while it cannot be fitted."""
        curve = self.curve()
        return None if curve is None else (curve[0], curve[1])

    def predict(self, batch: int, seq: int) -> float | None:
        """Seconds one pass of ``batch`` texts padded to ``seq`` tokens should take."""
        curve = self.curve()
        if curve is None:
            return None
        t0, t1, t2 = curve
        return t0 + batch * seq * (t1 + t2 * seq)

    @property
    def overhead_tokens(self) -> float:
        """The fixed cost of one pass, in padded tokens' worth of work."""
        fitted = self.line()
        if fitted is None or fitted[0] <= 0:
            # No fixed cost to see (long passes dominate the fit): every pass has one, so
            # an answer of zero would stop short texts riding along with the least padding.
            return self.prior_tokens
        t0, t1 = fitted
        return min(self.max_tokens, t0 / t1)
