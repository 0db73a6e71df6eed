"""How long a forward pass takes, learnt from the passes the server runs.

A pass costs a fixed part (Python and framework overhead per layer, reading the
weights) plus a part per padded token: T ≈ t0 + t1·B·S. Their ratio
``overhead_tokens = t0 / t1`` says how many padded tokens one extra pass is worth,
which is what the batch planner needs to decide whether a short text should ride
along, padded, with long ones, or wait for a pass of its own.

The fit is an exponentially weighted least-squares line through the recent
passes, so it follows the machine's real speed (threads, contention, dtype)
without a timing probe at startup. Until the passes vary enough to fit a line it
answers ``prior_tokens``.
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class PassPace:
    prior_tokens: float = 32.0
    decay: float = 0.98  # weight of the past per observation (~50 passes of memory)
    min_passes: int = 8
    max_tokens: float = 4096.0
    passes: int = 0
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, padded_tokens: int, seconds: float) -> None:
        """Record one finished pass."""
        if padded_tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        d = self.decay
        x, y = float(padded_tokens), seconds
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self.passes += 1

    def line(self) -> tuple[float, float] | None:
        """(t0 seconds, t1 seconds per padded token), or None while it cannot be fitted."""
        if self.passes < self.min_passes:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x <= (0.1 * mean_x) ** 2:  # all passes nearly the same size: no slope to see
            return None
        t1 = (self._xy / self._w - mean_x * mean_y) / var_x
        t0 = mean_y - t1 * mean_x
        if t1 <= 0:
            return None
        return max(0.0, t0), t1

    @property
    def overhead_tokens(self) -> float:
        """The fixed cost of one pass, in padded tokens' worth of work."""
        fitted = self.line()
        if fitted is None:
            return self.prior_tokens
        t0, t1 = fitted
        return min(self.max_tokens, t0 / t1)
