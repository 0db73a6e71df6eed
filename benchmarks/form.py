"""The measurements behind the cost model's form, the weight copy and the probe's shapes.

    python -m benchmarks.form [--parts m3,minilm] [--tables-only]

Each part runs in a fresh process (a process's first large pass pays one-off
allocations, which one part must not pay for another), fp32, predictable allocator:

- ``m3``, the full-size BGE-M3 stand-in (see ``benchmarks.m3``):
  - the resident size after loading and one warm-up pass (weights memory-mapped), after
    reading every weight, and after copying every weight into the process's memory;
  - at the probe's depth (two layers), weights resident: served passes at equal token
    counts over many lengths, single texts among them (is the peak a line in B·S?);
  - the (B, 1, S, S) attention mask transformers' models build from the (B, S) one
    against the served key-padding mask, the transformer alone, at padded shapes (what
    the expanded mask costs);
  - one layer against two (why the probe keeps two).
- ``minilm``, the bundled all-MiniLM-L6-v2 at 512 tokens, weights resident: the probe's
  warm-up shape measured twice (the first large pass of a process), the probe's four
  shapes and a one-text (1, 512) shape, and the fit with the one-text shape in place of
  the probe's first against the probe's own, judged on a held-out shape.
- ``sizes-fp32``, ``sizes-bf16``: all-MiniLM-L6-v2 at the probe's depth, passes of growing
  token counts (small passes cost more per token: why the probe's shapes are all large).
- ``kernel-caches-default``, ``kernel-caches-bounded``: what 40 bf16 passes of random
  shapes leave resident with the libraries' kernel caches as they come and as every
  bge-trio process bounds them.

Writes ``docs/results/memory-form.json`` and generates its tables into
``docs/memory-model.md`` between its ``memory-form-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.docs import load_result, result_path, save_result
from benchmarks.harness import m3_standin, machine
from benchmarks.reports.form import write_tables
from bge_trio.cgroups import cpu_count
from bge_trio.memory.cost import Point, fit_cost_model
from bge_trio.memory.plan import PROBE_LAYERS, synthetic_forward
from bge_trio.memory.probe import (
    PeakMeter,
    _warm_up_shape,
    malloc_trim,
    probe_shapes,
    resident_bytes,
)
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.model.transformer import Transformer, key_padding
from bge_trio.process import prepare_process

MIB = 1 << 20

# Equal token counts at many lengths; (1, S) rows are single texts (no padding).
M3_LINE_SHAPES = [
    (8, 16),
    (1, 128),
    (64, 16),
    (16, 64),
    (4, 256),
    (2, 512),
    (1, 1024),
    (256, 16),
    (64, 64),
    (16, 256),
    (4, 1024),
    (1, 4096),
    (1, 8192),
    (256, 64),
    (16, 1024),
    (2, 8192),
]
M3_MASK_SHAPES = [(4, 1024), (2, 4096), (2, 8192)]
M3_DEPTH_SHAPES = [(16, 128), (4, 1024)]
ALLOCATOR_SHAPE = (32, 128)
ALLOCATOR_ROUNDS = 8
REPEATS = 3  # the same shape measured again: how much one measurement can be trusted
MINILM_MAX_SEQ = 512
MINILM_HELD_OUT = (6, 448)


def _padded(encoder: Encoder, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids of a (batch, seq) batch whose last text is one token short, and its mask."""
    rng = np.random.default_rng(batch * seq)
    ids = torch.as_tensor(rng.integers(10, encoder.info.vocab_size, size=(batch, seq)))
    mask = torch.ones((batch, seq), dtype=torch.long)
    if batch > 1:
        ids[-1, -1] = encoder.pad_id
        mask[-1, -1] = 0
    return ids, mask


def _model_only(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor, expanded: bool) -> object:
    """The transformer's pass with the served (B, 1, 1, S) mask, or (``expanded``) with
    the (B, 1, S, S) mask transformers' models build from the (B, S) one."""
    model = encoder.model
    assert isinstance(model, Transformer)
    attend = key_padding(mask)
    if expanded:
        attend = attend.expand(-1, -1, ids.shape[1], -1).contiguous()
    with torch.inference_mode():
        hidden = model.embeddings(ids, None)
        for layer in model.encoder.layer:
            hidden = layer(hidden, attend)
        return hidden


def m3_part() -> dict[str, Any]:
    encoder = load_encoder(resolve_model(str(m3_standin())), dtype="fp32", threads=cpu_count())
    encoder.forward(encoder.tokenize(["warm-up"]), encoder.info.outputs)
    malloc_trim()
    loaded = resident_bytes()
    with torch.inference_mode():  # read every page of every weight, as traffic would
        for tensor in encoder.weight_tensors():
            float(tensor.sum())
    read_all = resident_bytes()
    weights = encoder.make_weights_resident()
    malloc_trim()
    copied = resident_bytes()
    print(f"  resident {loaded / MIB:.0f} -> {read_all / MIB:.0f} -> {copied / MIB:.0f} MiB")

    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    line = []
    with encoder.shallow(PROBE_LAYERS):
        forward(256, 64)  # the probe's warm-up: most tokens at a short length
        for batch, seq in M3_LINE_SHAPES:
            peak = _timed(meter, partial(forward, batch, seq), f"two layers {batch}x{seq}")
            line.append({"batch": batch, "seq": seq, "peak": peak})
        repeated = [
            _timed(meter, partial(forward, 4, 1024), "again 4x1024") for _ in range(REPEATS)
        ]
        mask = []
        for batch, seq in M3_MASK_SHAPES:
            ids, padding = _padded(encoder, batch, seq)
            own = _timed(
                meter,
                partial(_model_only, encoder, ids, padding, True),
                f"(B,S) mask {batch}x{seq}",
            )
            key = _timed(
                meter, partial(_model_only, encoder, ids, padding, False), f"key mask {batch}x{seq}"
            )
            mask.append({"batch": batch, "seq": seq, "expanded_mask": own, "key_padding_mask": key})
    depth = []
    for batch, seq in M3_DEPTH_SHAPES:
        row: dict[str, Any] = {"batch": batch, "seq": seq}
        for layers in (1, 2):
            with encoder.shallow(layers):
                row[f"layers_{layers}"] = _timed(
                    meter, partial(forward, batch, seq), f"{layers} layer(s) {batch}x{seq}"
                )
        depth.append(row)
    return {
        "model": "BGE-M3 stand-in (random weights)",
        "weights_bytes": weights,
        "resident": {"loaded": loaded, "every_weight_read": read_all, "weights_copied": copied},
        "line": line,
        "mask": mask,
        "depth": depth,
        "repeated": {"batch": 4, "seq": 1024, "peaks": repeated},
    }


def minilm_part() -> dict[str, Any]:
    encoder = load_encoder(resolve_model("bundled"), dtype="fp32", threads=cpu_count())
    encoder.make_weights_resident()
    encoder.forward(encoder.tokenize(["warm-up"]), encoder.info.outputs)
    malloc_trim()
    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    shapes = probe_shapes(MINILM_MAX_SEQ, float("inf"))
    warm = _warm_up_shape(shapes)
    first = _timed(meter, partial(forward, *warm), f"first {warm}")
    again = _timed(meter, partial(forward, *warm), f"again {warm}")
    peaks = {
        shape: _timed(meter, partial(forward, *shape), f"{shape}")
        for shape in [*shapes, (1, MINILM_MAX_SEQ), MINILM_HELD_OUT]
    }
    repeated = [_timed(meter, partial(forward, *shapes[1]), "again") for _ in range(REPEATS)]
    one_text = [(1, MINILM_MAX_SEQ) if shape == shapes[0] else shape for shape in shapes]
    fits = {}
    for name, chosen in (("probe_shapes", shapes), ("one_text_at_max_seq", one_text)):
        fit = fit_cost_model([Point(b, s, peaks[(b, s)]) for b, s in chosen]).model
        predicted = fit.predict(*MINILM_HELD_OUT)
        measured = peaks[MINILM_HELD_OUT]
        fits[name] = {
            "shapes": [list(shape) for shape in chosen],
            "a": fit.a,
            "b": fit.b,
            "c": fit.c,
            "held_out_predicted": predicted,
            "held_out_error_pct": 100 * (predicted - measured) / measured,
        }
    return {
        "model": "all-MiniLM-L6-v2",
        "max_seq": MINILM_MAX_SEQ,
        "warm_up": {"batch": warm[0], "seq": warm[1], "first": first, "again": again},
        "peaks": [{"batch": b, "seq": s, "peak": p} for (b, s), p in peaks.items()],
        "held_out": {"batch": MINILM_HELD_OUT[0], "seq": MINILM_HELD_OUT[1]},
        "fits": fits,
        "repeated": {"batch": shapes[1][0], "seq": shapes[1][1], "peaks": repeated},
    }


def allocator_part(allocator: str) -> dict[str, Any]:
    """One shape measured again and again between passes of other shapes, as traffic runs."""
    encoder = load_encoder(resolve_model("bundled"), dtype="fp32", threads=cpu_count())
    encoder.make_weights_resident()
    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    rng = np.random.default_rng(0)
    forward(*ALLOCATOR_SHAPE)
    peaks = []
    for _ in range(ALLOCATOR_ROUNDS):
        for _ in range(3):  # some history: passes of other sizes in between
            forward(int(rng.integers(1, 64)), int(rng.integers(16, MINILM_MAX_SEQ)))
        peaks.append(_timed(meter, partial(forward, *ALLOCATOR_SHAPE), allocator))
    return {
        "allocator": allocator,
        "batch": ALLOCATOR_SHAPE[0],
        "seq": ALLOCATOR_SHAPE[1],
        "peaks": peaks,
    }


# Passes of growing token counts at two lengths: below a few thousand tokens the matrix
# kernels choose other algorithms, and a pass costs more per token than a large one.
SIZE_SHAPES = [(2, 128), (4, 128), (8, 128), (16, 128), (32, 128), (64, 128), (2, 512), (30, 512)]
CACHE_PASSES = 40


def sizes_part(dtype: str) -> dict[str, Any]:
    """Peak per token of passes of growing size, at the probe's depth (why the probe's
    shapes are all large)."""
    encoder = load_encoder(
        resolve_model("bundled"), dtype=dtype, max_seq_length=MINILM_MAX_SEQ, threads=cpu_count()
    )
    encoder.make_weights_resident()
    meter = PeakMeter()
    forward = synthetic_forward(encoder)
    peaks = []
    with encoder.shallow(PROBE_LAYERS):
        forward(*_warm_up_shape(SIZE_SHAPES))
        for batch, seq in SIZE_SHAPES:
            forward(batch, seq)  # a new shape's kernels are compiled once, not in its peak
            peak = _timed(meter, partial(forward, batch, seq), f"{dtype} {batch} x {seq}")
            peaks.append({"batch": batch, "seq": seq, "peak": peak})
    return {"dtype": encoder.info.dtype, "peaks": peaks}


def kernel_cache_part() -> dict[str, Any]:
    """What bf16 passes of many shapes leave resident, with the kernel caches as the
    process has them (bounded by ``prepare_process``, or set larger by the caller)."""
    encoder = load_encoder(resolve_model("bundled"), dtype="bf16", threads=cpu_count())
    encoder.make_weights_resident()
    forward = synthetic_forward(encoder)
    forward(1, 8)
    malloc_trim()
    before = resident_bytes()
    rng = np.random.default_rng(0)
    for _ in range(CACHE_PASSES):
        forward(int(rng.integers(1, 17)), int(rng.integers(8, 257)))
    malloc_trim()
    capacity = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")
    print(f"  caches of {capacity}: +{(resident_bytes() - before) / MIB:.1f} MiB", flush=True)
    return {"capacity": capacity, "passes": CACHE_PASSES, "grown": resident_bytes() - before}


def _timed(meter: PeakMeter, fn: Callable[[], object], label: str) -> int:
    started = time.perf_counter()
    peak = meter.measure(fn)
    print(f"  {label}: {peak / MIB:.1f} MiB, {time.perf_counter() - started:.1f}s", flush=True)
    return peak


PARTS: dict[str, Callable[[], dict[str, Any]]] = {
    "m3": m3_part,
    "minilm": minilm_part,
    "allocator-predictable": partial(allocator_part, "predictable"),
    "allocator-fast": partial(allocator_part, "fast"),
    "sizes-fp32": partial(sizes_part, "fp32"),
    "sizes-bf16": partial(sizes_part, "bf16"),
    "kernel-caches-bounded": kernel_cache_part,
    "kernel-caches-default": kernel_cache_part,
}
# The libraries' own cache sizes, for the part that measures them (the process bounds them).
PART_ENV = {
    "kernel-caches-default": {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
        "LRU_CACHE_CAPACITY": "1024",
    }
}


def run_part(name: str) -> dict[str, Any]:
    """One part in a fresh process (its first large pass is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        subprocess.run(
            [sys.executable, "-m", "benchmarks.form", "--part", name, "--out", str(out)],
            check=True,
            env={**os.environ, **PART_ENV.get(name, {})},
        )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = result_path("memory-form")
    if args.part:
        allocator = args.part.removeprefix("allocator-")
        prepare_process(allocator if allocator in ("predictable", "fast") else "predictable")
        args.out.write_text(json.dumps(PARTS[args.part]()))
        return
    if not args.tables_only:
        report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        report["machine"] = machine()
        for name in args.parts.split(","):
            print(name, flush=True)
            report[name] = run_part(name)
        save_result("memory-form", report)
    write_tables(load_result("memory-form"))


if __name__ == "__main__":
    main()
