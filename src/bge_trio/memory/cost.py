"""The cost model W(B, S) = a*B*S + b*B*S^2 and its least-squares fit.

A transformer forward pass over B texts padded to S tokens allocates activations
that grow with the number of tokens (B*S: hidden states, feed-forward) and
attention scores that grow with B*S^2. ``a`` and ``b`` are bytes per token and per
token squared of peak memory above the pre-forward baseline.

The fit minimises the relative error of each point, and scales each column to unit
norm before solving, because B*S^2 is orders of magnitude larger than B*S and an
unscaled system is badly conditioned.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import attrs
import numpy as np

# Used when no fit is available: generous enough for BGE-M3 in fp32.
CONSERVATIVE_A = 16384.0
CONSERVATIVE_B = 8.0
# What a sane CPU transformer can cost; fits outside are clamped.
A_RANGE = (1.0, 64.0 * 1024 * 1024)
B_RANGE = (0.0, 64.0 * 1024)


class SingularFitError(ValueError):
    """The measured shapes cannot separate a from b."""


@attrs.frozen
class CostModel:
    a: float
    b: float

    def predict(self, batch: int, seq: int) -> float:
        """Predicted peak bytes above baseline for a (batch, seq) forward pass."""
        return batch * seq * (self.a + self.b * seq)

    def max_seq_within(self, budget: float) -> int:
        """The longest single text (B = 1) whose forward pass fits ``budget``."""
        if budget <= 0:
            return 0
        if math.isinf(budget):
            return sys.maxsize
        if self.b == 0:
            return int(budget // self.a)
        # b*S^2 + a*S - budget = 0
        root = (-self.a + math.sqrt(self.a * self.a + 4 * self.b * budget)) / (2 * self.b)
        seq = int(root)
        while seq > 0 and self.predict(1, seq) > budget:  # guard against rounding up
            seq -= 1
        return seq


CONSERVATIVE = CostModel(CONSERVATIVE_A, CONSERVATIVE_B)


@attrs.frozen
class Point:
    batch: int
    seq: int
    peak_bytes: int


@attrs.frozen
class Fit:
    model: CostModel
    residuals: tuple[float, ...]  # measured - predicted, bytes, one per point
    relative_errors: tuple[float, ...]  # residual / predicted, one per point
    clamped: bool

    @property
    def max_relative_error(self) -> float:
        return max((abs(r) for r in self.relative_errors), default=0.0)


def fit_cost_model(points: Sequence[Point], *, max_condition: float = 1e8) -> Fit:
    """Least-squares a and b through the points.

    Raises SingularFitError when the points cannot tell the two terms apart.
    """
    if len(points) < 2:
        raise SingularFitError("need at least two measured shapes")
    x = np.array([[p.batch * p.seq, p.batch * p.seq * p.seq] for p in points], dtype=np.float64)
    y = np.array([p.peak_bytes for p in points], dtype=np.float64)
    # Minimise relative, not absolute, error: a 2 MiB miss matters on a 20 MiB pass and not
    # on a 2 GiB one. Each row is divided by its measurement.
    row_weight = 1.0 / np.maximum(y, 1.0)
    x = x * row_weight[:, None]
    y = y * row_weight
    scale = np.linalg.norm(x, axis=0)
    if np.any(scale == 0):
        raise SingularFitError("a column of the design matrix is zero")
    xs = x / scale
    if np.linalg.matrix_rank(xs) < 2 or np.linalg.cond(xs) > max_condition:
        raise SingularFitError(
            "the shapes do not separate the B*S and B*S^2 terms (equal S everywhere?)"
        )
    coef, *_ = np.linalg.lstsq(xs, y, rcond=None)
    a, b = (coef / scale).tolist()
    ca = min(max(a, A_RANGE[0]), A_RANGE[1])
    cb = min(max(b, B_RANGE[0]), B_RANGE[1])
    model = CostModel(ca, cb)
    predicted = [model.predict(p.batch, p.seq) for p in points]
    residuals = tuple(float(p.peak_bytes - q) for p, q in zip(points, predicted, strict=True))
    relative = tuple(
        (p.peak_bytes - q) / q if q else 0.0 for p, q in zip(points, predicted, strict=True)
    )
    return Fit(model, residuals, relative, clamped=(ca != a or cb != b))
