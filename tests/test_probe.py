"""Real probes on real models, and the peak meter on real allocations."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch

from bge_trio.memory.allocator import configure_allocator
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


def test_shapes_separate_the_three_terms_and_include_the_longest_length() -> None:
    shapes = probe_shapes(512, workspace=1 << 40)
    assert shapes[0] == (2, 512)
    tokens = [b * s for b, s in shapes]
    # two shapes with the same tokens at different lengths: per-token vs per-token²
    same = [shape for shape, t in zip(shapes, tokens, strict=True) if tokens.count(t) >= 2]
    assert len({s for _, s in same}) >= 2
    # another token count: the per-pass constant
    assert len(set(tokens)) >= 3
    # real batches are padded, and so are the probe's batches
    assert all(b > 1 for b, _ in shapes)


def test_full_size_shapes_stay_few_and_small() -> None:
    shapes = probe_shapes(8192, workspace=1 << 40)
    assert shapes == [(2, 8192), (4, 2048), (16, 512), (2, 1024)]


def test_shapes_respect_the_budget() -> None:
    budget = CONSERVATIVE.predict(1, 512) * 3
    shapes = probe_shapes(512, workspace=budget)
    assert shapes
    assert all(CONSERVATIVE.predict(b, s) <= budget for b, s in shapes)


def _probe(encoder: Encoder) -> None:
    shapes = probe_shapes(encoder.info.max_seq_length, 1 << 40)
    run = run_probe(synthetic_forward(encoder), shapes)
    assert [(p.batch, p.seq) for p in run.points] == shapes
    # the fit covers every measured shape and stays close to it
    for point in run.points:
        predicted = run.fit.model.predict(point.batch, point.seq)
        assert point.peak_bytes <= predicted * (1 + 1e-9)
    assert run.fit.max_relative_error < 0.5


def test_real_probe_on_the_tiny_model(tiny_encoder: Encoder) -> None:
    _probe(tiny_encoder)


def test_real_probe_on_minilm(bundled_source: ModelSource) -> None:
    encoder = Encoder.load(bundled_source, max_seq_length=128, dtype="fp32", threads=2)
    _probe(encoder)


def _layers(encoder: Encoder) -> torch.nn.ModuleList:
    return cast(torch.nn.ModuleList, encoder.model.get_submodule("encoder.layer"))


def test_a_two_layer_pass_peaks_where_the_full_depth_does(bundled_source: ModelSource) -> None:
    configure_allocator("predictable")  # as the server runs: peaks that repeat
    encoder = Encoder.load(bundled_source, dtype="fp32", threads=2)
    # as the server does: memory-mapped weight pages the kernel reclaims and a pass faults
    # back in would count in one peak and not the other
    encoder.make_weights_resident()
    layers = _layers(encoder)
    forward = synthetic_forward(encoder)
    meter = PeakMeter()

    def steady_peak() -> int:
        forward(16, 256)  # one-off allocations of a new shape are not the layers' cost
        return min(meter.measure(lambda: forward(16, 256)) for _ in range(3))

    full = steady_peak()
    with encoder.shallow(2) as depth:
        assert depth == 2
        assert len(_layers(encoder)) == 2
        shallow = steady_peak()
    assert _layers(encoder) is layers  # restored
    # in a long-lived test process the heap adds a few percent of noise; the benchmark
    # (benchmarks/m3.py) compares the two at full size in a fresh process
    assert shallow == pytest.approx(full, rel=0.1)


def test_a_model_without_more_layers_than_asked_runs_whole(tiny_encoder: Encoder) -> None:
    with tiny_encoder.shallow(8) as depth:
        assert depth == 2
