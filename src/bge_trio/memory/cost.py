"""The cost model W(B, S) = c + a·B·S + b·B·S² and its least-squares fit.

A forward pass over B texts padded to S tokens needs, above the resident size before
it, a fixed part per pass (``c``: workspace buffers, the pass's own bookkeeping), a
part per token (``a``: hidden states and the feed-forward intermediates of the layer
being computed) and a part per token squared (``b``: attention scores, where they are
materialised). Measured on BGE-M3's architecture with SDPA attention and a
key-padding mask the peak is linear in B·S from S = 16 to 8192 (``benchmarks.form``,
docs/memory-model.md), so ``b`` usually fits to zero; it stays in
the form for models whose attention does grow with S².

The fit minimises the relative error of each point with each column scaled to unit
norm (1, B·S and B·S² differ by orders of magnitude). A coefficient that would come
out negative is dropped and the rest refitted (a memory cost cannot be negative).
Finally the model is raised until no measured point is above it, so the probe's own
shapes are never under-predicted. It is raised by adding to the per-pass constant,
not by scaling: a point a few MiB above the line then costs every prediction those
MiB, where scaling would cost the largest passes the same percentage.
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
C_RANGE = (0.0, 64.0 * 1024 * 1024 * 1024)


class SingularFitError(ValueError):
    """The measured shapes cannot separate the terms."""


@attrs.frozen
class CostModel:
    a: float  # bytes per token
    b: float  # bytes per token squared
    c: float = 0.0  # bytes per pass

    def predict(self, batch: int, seq: int) -> float:
        """Predicted peak bytes above baseline for a (batch, seq) forward pass."""
        return self.c + batch * seq * (self.a + self.b * seq)

    def scaled(self, factor: float) -> CostModel:
        """Every term times ``factor`` (a correction learnt from served passes)."""
        return CostModel(self.a * factor, self.b * factor, self.c * factor)

    def max_seq_within(self, budget: float) -> int:
        """The longest single text (B = 1) whose forward pass fits ``budget``."""
        if math.isinf(budget):
            return sys.maxsize
        room = budget - self.c
        if room <= 0:
            return 0
        if self.b == 0:
            seq = int(room // self.a)
        else:  # b*S^2 + a*S - room = 0
            seq = int((-self.a + math.sqrt(self.a * self.a + 4 * self.b * room)) / (2 * self.b))
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
    clamped: bool  # a coefficient was dropped or held to its range

    @property
    def max_relative_error(self) -> float:
        return max((abs(r) for r in self.relative_errors), default=0.0)


def fit_cost_model(points: Sequence[Point], *, max_condition: float = 1e8) -> Fit:
    """Least-squares c, a and b through the points, raised to cover every point.

    Raises SingularFitError when the points cannot tell the per-token and per-token²
    terms apart (every shape has the same S, or fewer than two shapes).
    """
    if len(points) < 2:
        raise SingularFitError("need at least two measured shapes")
    if len({p.seq for p in points}) < 2:
        raise SingularFitError(
            "the shapes do not separate the B*S and B*S^2 terms (equal S everywhere)"
        )
    tokens = np.array([p.batch * p.seq for p in points], dtype=np.float64)
    seqs = np.array([p.seq for p in points], dtype=np.float64)
    y = np.array([p.peak_bytes for p in points], dtype=np.float64)
    columns = {"c": np.ones_like(y), "a": tokens, "b": tokens * seqs}
    # A constant needs two token counts to be told from the per-token cost.
    active = ["c", "a", "b"] if len(set(tokens.tolist())) >= 2 else ["a", "b"]
    dropped = False
    while True:
        coef = _solve([columns[n] for n in active], y, max_condition)
        negative = [n for n, v in zip(active, coef, strict=True) if v < 0 and n != "a"]
        if not negative:
            break
        worst = min(negative, key=lambda n: coef[active.index(n)])
        active.remove(worst)
        dropped = True
    values = dict(zip(active, coef, strict=True))
    a = values.get("a", 0.0)
    ca = min(max(a, A_RANGE[0]), A_RANGE[1])
    cb = min(max(values.get("b", 0.0), B_RANGE[0]), B_RANGE[1])
    cc = min(max(values.get("c", 0.0), C_RANGE[0]), C_RANGE[1])
    model = CostModel(ca, cb, cc)
    # Raise the model until it covers every measured point: the probe's own shapes
    # must never be under-predicted.
    shortfall = max(p.peak_bytes - model.predict(p.batch, p.seq) for p in points)
    if shortfall > 0:
        model = attrs.evolve(model, c=model.c + shortfall)
    predicted = [model.predict(p.batch, p.seq) for p in points]
    residuals = tuple(float(p.peak_bytes - q) for p, q in zip(points, predicted, strict=True))
    relative = tuple(
        (p.peak_bytes - q) / q if q else 0.0 for p, q in zip(points, predicted, strict=True)
    )
    return Fit(model, residuals, relative, clamped=dropped or ca != a)


def _solve(cols: list[np.ndarray], y: np.ndarray, max_condition: float) -> list[float]:
    x = np.stack(cols, axis=1)
    # Minimise relative, not absolute, error: a 2 MiB miss matters on a 20 MiB pass and not
    # on a 2 GiB one. Each row is divided by its measurement.
    row_weight = 1.0 / np.maximum(y, 1.0)
    xw = x * row_weight[:, None]
    yw = y * row_weight
    scale = np.linalg.norm(xw, axis=0)
    if np.any(scale == 0):
        raise SingularFitError("a column of the design matrix is zero")
    xs = xw / scale
    if np.linalg.matrix_rank(xs) < xs.shape[1] or np.linalg.cond(xs) > max_condition:
        raise SingularFitError("the shapes do not separate the terms of the cost model")
    coef, *_ = np.linalg.lstsq(xs, yw, rcond=None)
    return (coef / scale).tolist()  # type: ignore[no-any-return]
