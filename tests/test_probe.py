"""Real probes on real models, and the peak meter on real allocations."""

from __future__ import annotations

import numpy as np
import pytest

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.plan import synthetic_forward
from bge_trio.memory.probe import PeakMeter, probe_shapes, run_probe
from bge_trio.model.encoder import Encoder
from bge_trio.model.source import ModelSource

MIB = 1 << 20


@pytest.mark.parametrize("method", ["vmhwm", "sampling"])
def test_meter_sees_a_real_allocation(method: str) -> None:
    meter = PeakMeter(method)

    def allocate() -> None:
        block = np.ones(200 * MIB // 8)  # touched, so resident
        block[::512] = 2.0
        if method == "sampling":
            import time

            time.sleep(0.05)  # give the sampler time to see it

    peak = meter.measure(allocate)
    assert 180 * MIB < peak < 400 * MIB


def test_shapes_share_tokens_and_include_the_longest_single_text() -> None:
    shapes = probe_shapes(512, workspace=1 << 40)
    assert (1, 512) in shapes
    grid = [s for s in shapes if s != (1, 512)]
    assert len({b * s for b, s in grid}) == 1
    assert len({s for _, s in grid}) >= 3


def test_shapes_respect_the_budget() -> None:
    budget = CONSERVATIVE.predict(1, 512) * 3
    shapes = probe_shapes(512, workspace=budget)
    assert shapes
    assert all(CONSERVATIVE.predict(b, s) <= budget for b, s in shapes)


def _probe(encoder: Encoder) -> None:
    shapes = probe_shapes(encoder.info.max_seq_length, 1 << 40)
    run = run_probe(synthetic_forward(encoder), shapes)
    assert run.fit.model.a > 0
    assert run.fit.model.b >= 0
    assert len(run.points) == len(shapes)
    assert all(p.peak_bytes > 0 for p in run.points)
    assert run.method in {"vmhwm", "sampling"}


def test_real_probe_on_the_tiny_model(tiny_encoder: Encoder) -> None:
    _probe(tiny_encoder)


def test_real_probe_on_minilm(bundled_source: ModelSource) -> None:
    encoder = Encoder.load(bundled_source, max_seq_length=128, threads=2)
    _probe(encoder)
