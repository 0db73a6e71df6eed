"""Real probes on real models, and the peak meter on real allocations."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.plan import synthetic_forward
from bge_trio.memory.probe import PeakMeter, ProbeRun, _warm_up_shape, probe_shapes, run_probe
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
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

    # what earlier tests in this process left for the collector is freed now, not while
    # the block is measured (a model's weights unmapped then would hide part of the block)
    gc.collect()
    peak = meter.measure(allocate)
    # the block itself, give or take the pages of the interpreter around it
    assert 196 * MIB < peak < 208 * MIB


def test_shapes_separate_the_three_terms_and_include_the_longest_length() -> None:
    shapes = probe_shapes(512, workspace=1 << 40)
    assert shapes[0] == (8, 512)
    tokens = [b * s for b, s in shapes]
    # three shapes with the same tokens at different lengths: per-token vs per-token²
    same = [shape for shape, t in zip(shapes, tokens, strict=True) if tokens.count(t) >= 2]
    assert len({s for _, s in same}) >= 3
    # another token count: the per-pass constant
    assert len(set(tokens)) == 2
    # real batches are padded, and so are the probe's batches
    assert all(b > 1 for b, _ in shapes)
    # every shape is large: small passes cost more per token (other kernels) and would
    # bend the fit away from the large passes the budget is about
    assert min(tokens) >= 4096


def test_full_size_shapes_stay_few_and_small() -> None:
    shapes = probe_shapes(8192, workspace=1 << 40)
    # one text at the longest length: attention over 8,192 positions is the slow part
    assert shapes == [(1, 8192), (4, 2048), (16, 512), (8, 512)]
    # the warm-up pays a large pass's one-off allocations with short texts
    assert _warm_up_shape(shapes) == (16, 512)


def test_shapes_respect_the_budget() -> None:
    budget = CONSERVATIVE.predict(1, 512) * 3
    shapes = probe_shapes(512, workspace=budget)
    assert shapes
    assert all(CONSERVATIVE.predict(b, s) <= budget for b, s in shapes)


def _probe(encoder: Encoder) -> ProbeRun:
    shapes = probe_shapes(encoder.info.max_seq_length, 1 << 40)
    run = run_probe(synthetic_forward(encoder), shapes)
    assert [(p.batch, p.seq) for p in run.points] == shapes
    # the fit is raised to cover every measured shape (the budget errs on the safe side)
    # and stays close to them
    for point in run.points:
        predicted = run.fit.model.predict(point.batch, point.seq)
        assert point.peak_bytes <= predicted * (1 + 1e-9)
    assert run.fit.max_relative_error < 0.5
    return run


def test_real_probe_on_the_tiny_model(tiny_encoder: Encoder) -> None:
    _probe(tiny_encoder)


def test_real_probe_on_minilm(bundled_source: ModelSource) -> None:
    """Shapes the probe did not run are predicted in test_the_probe_predicts_held_out_passes,
    in a fresh process: in this long-lived one the heap's state moves peaks by tens of
    percent."""
    encoder = load_encoder(bundled_source, max_seq_length=128, dtype="fp32", threads=2)
    _probe(encoder)


# Runs in a fresh process, as the probe does: in a long-lived test process the heap's
# state moves a pass's peak by more than the difference this guards.
_LAYERS_SCRIPT = """
import json
from bge_trio.memory.plan import synthetic_forward
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

prepare_process("predictable")  # as the server runs: peaks that repeat
encoder = load_encoder(resolve_model("bundled"), dtype="fp32", threads=2)
# as the server does: memory-mapped weight pages the kernel reclaims and a pass faults
# back in would count in one peak and not the other
encoder.make_weights_resident()
layers = encoder.model.get_submodule("encoder.layer")
forward, meter = synthetic_forward(encoder), PeakMeter()


def steady_peak():
    forward(16, 256)  # one-off allocations of a new shape are not the layers' cost
    return min(meter.measure(lambda: forward(16, 256)) for _ in range(3))


peaks = {"full": steady_peak()}
for depth in (2, 1):
    with encoder.shallow(depth) as ran:
        assert ran == depth == len(encoder.model.get_submodule("encoder.layer"))
        peaks[depth] = steady_peak()
assert encoder.model.get_submodule("encoder.layer") is layers  # restored
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_a_two_layer_pass_peaks_where_the_full_depth_does() -> None:
    """all-MiniLM-L6-v2's six layers and the probe's two peak alike (within 0.3 % when
    measured), and so does one: the embedding output is let go after the first layer (in
    transformers' BertModel it stayed referenced, and one layer peaked 9 % lower)."""
    done = subprocess.run(
        [sys.executable, "-c", _LAYERS_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert peaks["2"] == pytest.approx(peaks["full"], rel=0.02)
    assert peaks["1"] == pytest.approx(peaks["full"], rel=0.02)


def test_a_model_without_more_layers_than_asked_runs_whole(tiny_encoder: Encoder) -> None:
    with tiny_encoder.shallow(8) as depth:
        assert depth == 2


# Runs in a fresh process, as a server's probe does: the probe, then held-out passes of
# other shapes measured the same way, each against the fitted model's prediction.
_HELD_OUT_SCRIPT = """
import json, sys
from pathlib import Path
from bge_trio.config import Settings
from bge_trio.memory.plan import measure_budget, plan_memory, synthetic_forward
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

dtype, cache = sys.argv[1], Path(sys.argv[2])
prepare_process("predictable")
encoder = load_encoder(resolve_model("bundled"), dtype=dtype, max_seq_length=512, threads=2)
settings = Settings(
    model="bundled", dtype=dtype, probe="force", cache_dir=cache, memory_limit_bytes=3 << 29
)
budget = measure_budget(encoder, settings)
plan = plan_memory(encoder, settings, budget)
forward, meter = synthetic_forward(encoder), PeakMeter()
held = []
for batch, seq in [(10, 448), (20, 400), (30, 512), (96, 64), (160, 32), (6, 448), (2, 384)]:
    peak = meter.measure(lambda: forward(batch, seq))
    held.append([batch, seq, peak, plan.cost.predict(batch, seq)])
print(json.dumps({"status": plan.status, "dtype": encoder.info.dtype,
                  "workspace": budget.workspace_bytes, "held": held}))
"""


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_probe_predicts_held_out_passes(dtype: str, tmp_path: Path) -> None:
    """Passes of shapes the probe never ran, each of at least 5 % of the workspace, peak
    never more than 5 % above the prediction and at most 20 % under it, in fp32 and in bf16
    (emulated where the CPU has no native bf16). Under-prediction is what a memory limit
    cannot afford; over-prediction only costs batch size. Measured runs stay within 10 %,
    but on a Xeon with AMX, in bf16, one freshly installed environment over-predicted
    30 x 512 by 14-16 % (another, on the same machine, by 8 %)."""
    done = subprocess.run(
        [sys.executable, "-c", _HELD_OUT_SCRIPT, dtype, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["status"], report["dtype"]) == ("complete", dtype)
    counted = [h for h in report["held"] if h[2] >= 0.05 * report["workspace"]]
    assert len(counted) >= 3, report
    for batch, seq, measured, predicted in counted:
        error = (predicted - measured) / measured
        assert -0.05 <= error <= 0.20, (batch, seq, measured, predicted)


_SHAPES_SCRIPT = """
import json, sys
import numpy as np
from bge_trio.memory.plan import synthetic_forward
from bge_trio.memory.probe import malloc_trim, resident_bytes
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process

prepare_process("predictable")
encoder = load_encoder(resolve_model("bundled"), dtype="bf16", threads=2)
encoder.make_weights_resident()
forward = synthetic_forward(encoder)
forward(1, 8)
malloc_trim()
before = resident_bytes()
rng = np.random.default_rng(0)
for batch, seq in zip(rng.integers(1, 9, 48), rng.integers(8, 160, 48), strict=True):
    forward(int(batch), int(seq))
malloc_trim()
print(json.dumps({"grown": resident_bytes() - before}))
"""


@pytest.mark.slow
def test_many_distinct_batch_shapes_do_not_grow_a_bf16_process() -> None:
    """bf16 matrix kernels are compiled and cached per shape; with the libraries' default
    caches 48 distinct shapes leave tens of MiB resident for good, past what the budget
    counted. The process bounds the caches, so the resident size stays put."""
    done = subprocess.run(
        [sys.executable, "-c", _SHAPES_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout.strip().splitlines()[-1])["grown"]
    assert grown < 24 * MIB, grown / MIB  # 104 MiB with the default caches
