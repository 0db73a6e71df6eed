"""bf16 and int8 variants stay close to fp32, and each has its own probe cache entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bge_trio.config import Settings
from bge_trio.memory.cache import make_key
from bge_trio.memory.plan import cache_key_for
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import bf16_supported
from bge_trio.model.source import ModelSource, resolve_model

TEXTS = ["A cat sleeps on the sofa.", "The stock market fell sharply.", "Bonjour le monde"]


@pytest.fixture(scope="module")
def fp32(bundled_source: ModelSource) -> Encoder:
    return Encoder.load(bundled_source, dtype="fp32", threads=2)


@pytest.mark.parametrize(("dtype", "min_cosine"), [("bf16", 0.99), ("int8", 0.9)])
def test_variant_is_close_to_fp32(
    bundled_source: ModelSource, fp32: Encoder, dtype: str, min_cosine: float
) -> None:
    if dtype == "bf16" and not bf16_supported():
        pytest.skip("this CPU has no native bf16 (the fallback is tested in test_config.py)")
    variant = Encoder.load(bundled_source, dtype=dtype, threads=2)
    assert variant.info.dtype == dtype  # not an fp32 compared with itself
    ids = fp32.tokenize(TEXTS)
    for a, b in zip(fp32.forward(ids), variant.forward(ids), strict=True):
        assert a.dense is not None
        assert b.dense is not None
        assert float(np.dot(a.dense, b.dense)) > min_cosine


def test_bf16_runs_bf16_weights_and_answers_in_float32(tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    reference = Encoder.load(source, dtype="fp32", threads=2)
    variant = Encoder.load(source, dtype="bf16", threads=2)
    if variant.info.dtype != "bf16":
        pytest.skip("this CPU has no fast bf16")
    assert {p.dtype for p in variant.model.parameters()} == {torch.bfloat16}
    ids = reference.tokenize(TEXTS)
    outputs = reference.info.outputs
    for a, b in zip(reference.forward(ids, outputs), variant.forward(ids, outputs), strict=True):
        assert b.dense is not None
        assert b.colbert is not None
        assert b.sparse is not None
        assert a.colbert is not None
        assert b.dense.dtype == b.colbert.dtype == b.sparse[1].dtype == np.float32
        assert float(np.mean(np.sum(a.colbert * b.colbert, axis=1))) > 0.99


def test_dtype_is_part_of_the_cache_key(tiny_encoder: Encoder, tiny_model_dir: Path) -> None:
    int8 = Encoder.load(resolve_model(str(tiny_model_dir)), dtype="int8", threads=1)
    settings = Settings(model="tiny")
    key = cache_key_for(tiny_encoder, settings)  # (threads are read now: the same for both)
    assert key["dtype"] == "fp32"
    assert key["allocator"] == "predictable"
    other = cache_key_for(int8, settings)
    assert other["dtype"] == "int8"
    assert {k: v for k, v in other.items() if k != "dtype"} == {
        k: v for k, v in key.items() if k != "dtype"
    }
    assert make_key(**other).digest != make_key(**key).digest


def test_bf16_detection_is_torch_s_own_answer() -> None:
    assert bf16_supported() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
