"""The cost model and its least-squares fit."""

from __future__ import annotations

import numpy as np
import pytest

from bge_trio.memory.cost import (
    A_RANGE,
    CostModel,
    Point,
    SingularFitError,
    fit_cost_model,
)

SHAPES = [(64, 64), (32, 128), (16, 256), (8, 512), (1, 512), (2, 1024)]


def _points(a: float, b: float, noise: float = 0.0, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    model = CostModel(a, b)
    return [
        Point(bs, s, int(model.predict(bs, s) * (1 + rng.uniform(-noise, noise))))
        for bs, s in SHAPES
    ]


def test_fit_recovers_exact_coefficients() -> None:
    fit = fit_cost_model(_points(30_000, 12.0))
    assert fit.model.a == pytest.approx(30_000, rel=1e-6)
    assert fit.model.b == pytest.approx(12.0, rel=1e-4)
    assert fit.max_relative_error < 1e-6
    assert not fit.clamped


def test_fit_with_noise_stays_close() -> None:
    points = _points(30_000, 12.0, noise=0.03, seed=7)
    fit = fit_cost_model(points)
    assert fit.model.a == pytest.approx(30_000, rel=0.10)
    assert fit.model.b == pytest.approx(12.0, rel=0.35)
    # the lift that covers the noisiest point is at most twice the noise of the largest
    largest = max(p.peak_bytes for p in points)
    assert max(abs(r) for r in fit.residuals) < 2 * 0.03 * largest
    assert len(fit.residuals) == len(SHAPES)


def test_negative_quadratic_term_is_clamped_to_zero() -> None:
    # peak shrinking with sequence length at fixed tokens: b would come out negative
    points = [Point(64, 64, 4_200_000), Point(32, 128, 4_100_000), Point(8, 512, 3_900_000)]
    fit = fit_cost_model(points)
    assert fit.clamped
    assert fit.model.b == 0.0
    assert A_RANGE[0] <= fit.model.a <= A_RANGE[1]


def test_equal_lengths_cannot_separate_the_terms() -> None:
    with pytest.raises(SingularFitError):
        fit_cost_model([Point(1, 128, 1000), Point(4, 128, 4000), Point(8, 128, 8000)])
    with pytest.raises(SingularFitError):
        fit_cost_model([Point(1, 128, 1000)])


def test_max_seq_within_is_the_exact_boundary() -> None:
    model = CostModel(30_000, 12.0)
    for budget in (1e6, 5e7, 3.3e9):
        seq = model.max_seq_within(budget)
        assert model.predict(1, seq) <= budget < model.predict(1, seq + 1)
    assert CostModel(100.0, 0.0).max_seq_within(1000) == 10
    assert model.max_seq_within(0) == 0


def test_a_point_above_the_line_raises_the_constant_not_the_slope() -> None:
    """The fit covers every measured point by adding the shortfall to the per-pass
    constant: a point some MiB above the line costs large passes those MiB, not the
    same percentage."""
    line = CostModel(20_000.0, 0.0)
    points = [Point(b, s, int(line.predict(b, s))) for b, s in [(8, 512), (32, 128), (64, 64)]]
    above = Point(128, 32, int(line.predict(128, 32)) + 3_000_000)
    fit = fit_cost_model([*points, above])
    assert all(p.peak_bytes <= fit.model.predict(p.batch, p.seq) + 1 for p in [*points, above])
    # a pass 100 times larger is over-predicted by about the 3 MB, not by a percentage
    big = line.predict(100, 8192)
    assert fit.model.predict(100, 8192) - big < 0.02 * big
