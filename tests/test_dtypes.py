"""bf16 and int8 variants stay close to fp32, and each has its own probe cache entry.

bf16 runs on every CPU here: asked for explicitly, it is served even where the CPU
only emulates it, so a machine without native bf16 still runs its code paths."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_trio.config import Settings
from bge_trio.memory.cache import make_key
from bge_trio.memory.plan import cache_key_for
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import bf16_supported, load_encoder
from bge_trio.model.source import ModelSource, resolve_model
from bge_trio.testing.docs import decoder_from_docs
from tests.conftest import SettingsFactory, running_server
from tests.reference import ReferenceM3

decode = decoder_from_docs(Path(__file__).resolve().parent.parent / "docs" / "api.md")

TEXTS = ["A cat sleeps on the sofa.", "The stock market fell sharply.", "Bonjour le monde"]


@pytest.fixture(scope="module")
def fp32(bundled_source: ModelSource) -> Encoder:
    return load_encoder(bundled_source, dtype="fp32", threads=2)


@pytest.mark.parametrize(("dtype", "min_cosine"), [("bf16", 0.99), ("int8", 0.9)])
def test_variant_is_close_to_fp32(
    bundled_source: ModelSource, fp32: Encoder, dtype: str, min_cosine: float
) -> None:
    variant = load_encoder(bundled_source, dtype=dtype, threads=2)
    assert variant.info.dtype == dtype  # not an fp32 compared with itself
    ids = fp32.tokenize(TEXTS)
    for a, b in zip(fp32.forward(ids), variant.forward(ids), strict=True):
        assert a.dense is not None
        assert b.dense is not None
        assert float(np.dot(a.dense, b.dense)) > min_cosine


def test_bf16_runs_bf16_weights_and_answers_in_float32(tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    reference = load_encoder(source, dtype="fp32", threads=2)
    variant = load_encoder(source, dtype="bf16", threads=2)
    assert variant.info.dtype == "bf16"
    assert variant.model is not None
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


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_dtype_is_part_of_the_cache_key(
    tiny_encoder: Encoder, tiny_model_dir: Path, dtype: str
) -> None:
    variant = load_encoder(resolve_model(str(tiny_model_dir)), dtype=dtype, threads=1)
    settings = Settings(model="tiny")
    key = cache_key_for(tiny_encoder, settings)  # (threads are read now: the same for both)
    assert key["dtype"] == "fp32"
    assert key["allocator"] == "predictable"
    other = cache_key_for(variant, settings)
    assert other["dtype"] == dtype
    assert {k: v for k, v in other.items() if k != "dtype"} == {
        k: v for k, v in key.items() if k != "dtype"
    }
    assert make_key(**other).digest != make_key(**key).digest


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.is_file():
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo")


def test_native_bf16_follows_the_cpu_s_own_flags() -> None:
    """What ``auto`` decides on, checked against the kernel's list of CPU features: the
    bf16 dot-product instructions (AVX512-BF16) or AMX mean native bf16; a CPU without
    AVX-512 at all has none."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("ONEDNN_MAX_CPU_ISA caps what oneDNN uses below what the CPU has")
    flags = _cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert bf16_supported()
    elif "avx512f" not in flags:
        assert not bf16_supported()
    else:
        pytest.skip("AVX-512 without its bf16 instructions: oneDNN decides")


async def test_a_bf16_server_answers_every_output_near_the_fp32_reference(
    tiny_model_dir: Path, settings_for: SettingsFactory, reference: ReferenceM3
) -> None:
    """Served in bf16 (emulated where the CPU has no native bf16), every output stays close
    to the fp32 reference, in full and compact encodings."""
    texts = ["The quick brown fox jumps over the lazy dog.", "A cat sleeps.", "Hybrid retrieval"]
    expected = reference.encode(texts)
    async with running_server(settings_for(tiny_model_dir, dtype="bf16")) as server:
        info = (await server.client.get("/info")).json()
        assert info["dtype"] == "bf16"
        for fmt in ("float", "int8"):
            body = {"input": texts, "outputs": ["dense", "sparse", "colbert"]}
            r = await server.client.post("/v1/embeddings", json={**body, "encoding_format": fmt})
            assert r.status_code == 200, r.text
            for item, ref in zip(r.json()["data"], expected, strict=True):
                dense = decode(item["embedding"], fmt, len(ref.dense))
                assert float(np.dot(dense, ref.dense)) > 0.99
                colbert = np.array(
                    [decode(v, fmt, ref.colbert.shape[1]) for v in item["colbert_embeddings"]]
                )
                assert colbert.shape == ref.colbert.shape
                assert float(np.mean(np.sum(colbert * ref.colbert, axis=1))) > 0.98
                sparse = dict(
                    zip(
                        item["sparse_values"]["indices"],
                        item["sparse_values"]["values"],
                        strict=True,
                    )
                )
                shared = set(sparse) & set(ref.sparse)
                assert len(shared) >= 0.8 * len(set(sparse) | set(ref.sparse))
                for token in shared:
                    assert sparse[token] == pytest.approx(ref.sparse[token], abs=0.05)
