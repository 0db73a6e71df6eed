"""The OpenVINO backend: the same outputs as the torch reference, a conversion cached
whole, passes stopped when nobody waits, its own express lane, and the choice of backend."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pyarrow.parquet as pq
import pytest
import trio

from bge_trio.api.reports import health
from bge_trio.config import ConfigError, Settings
from bge_trio.engine import EngineStatistics
from bge_trio.engine.backend import (
    CHOICE_FILE,
    OPENVINO_EXPRESS_TOKENS,
    express_tokens,
    openvino_directory,
)
from bge_trio.engine.prepare import load_model, prepare
from bge_trio.engine.state import Loading
from bge_trio.memory.plan import synthetic_forward
from bge_trio.memory.probe import resident_bytes
from bge_trio.model import openvino as ov_backend
from bge_trio.model.encoder import SCORE, Encoder, PassAbandoned
from bge_trio.model.loading import OpenVinoTarget, load_encoder
from bge_trio.model.source import ModelSource, resolve_model
from bge_trio.testing.processes import env_for
from bge_trio.testing.tiny_reranker import build_tiny_bert_cross_encoder
from tests.command import RunHere
from tests.conftest import Conversions, running_server, seed_openvino
from tests.encoders import loader_with
from tests.reference import ReferenceM3

TEXTS = [
    "BGE-M3 serves dense, sparse and multi-vector embeddings.",
    "short",
    "Trio structured concurrency keeps every task inside a nursery. " * 6,
    "naïve café 東京 — ünïcödé",
]


def _openvino(source: ModelSource, directory: Path, dtype: str, express: int = 0) -> Encoder:
    return load_encoder(source, dtype=dtype, threads=2, openvino=OpenVinoTarget(directory, express))


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fp32_torch(bundled_source: ModelSource) -> Encoder:
    return load_encoder(bundled_source, dtype="fp32", threads=2)


@pytest.fixture(scope="module")
def corpus_ids(fp32_torch: Encoder) -> list[list[int]]:
    texts = [
        json.loads(line)["text"]
        for line in (Path(__file__).parents[1] / "benchmarks" / "corpus.jsonl").open()
    ][:64]
    return [fp32_torch.truncate(ids, 256) for ids in fp32_torch.tokenize(texts)]


@pytest.fixture(scope="module")
def reference_dense(fp32_torch: Encoder, corpus_ids: list[list[int]]) -> np.ndarray[Any, Any]:
    return _dense(fp32_torch, corpus_ids)


def _dense(encoder: Encoder, ids: list[list[int]], **kwargs: Any) -> np.ndarray[Any, Any]:
    out = []
    for start in range(0, len(ids), 16):
        out += [e.dense for e in encoder.forward(ids[start : start + 16], **kwargs)]
    return np.stack(out)  # type: ignore[arg-type]


@pytest.mark.heavy
@pytest.mark.parametrize(("dtype", "least"), [("fp32", 0.999999), ("bf16", 0.9999)])
def test_minilm_dense_vectors_equal_the_fp32_reference(
    dtype: str,
    least: float,
    bundled_source: ModelSource,
    corpus_ids: list[list[int]],
    reference_dense: np.ndarray[Any, Any],
    conversions: Conversions,
) -> None:
    """64 texts of the benchmark corpus (up to 256 tokens, padded in batches of 16): every
    dense vector's cosine to torch fp32 at least ``least``, on the regular and the
    express lane alike."""
    reference = reference_dense
    encoder = _openvino(bundled_source, conversions(bundled_source, dtype), dtype, express=1)
    assert (encoder.backend, encoder.info.dtype, encoder.model) == ("openvino", dtype, None)
    served = _dense(encoder, corpus_ids)
    assert _cosines(served, reference).min() >= least
    express = _dense(encoder, corpus_ids[:32], express=True)
    assert _cosines(express, reference[:32]).min() >= least


def test_tiny_m3_outputs_equal_flag_embedding(
    tiny_model_dir: Path, reference: ReferenceM3, conversions: Conversions
) -> None:
    """Dense, sparse and ColBERT through OpenVINO (fp32) equal FlagEmbedding's outputs."""
    source = resolve_model(str(tiny_model_dir))
    encoder = _openvino(source, conversions(source, "fp32"), "fp32")
    ids = encoder.tokenize(TEXTS)
    got = encoder.forward(ids, encoder.info.outputs)
    for mine, ref in zip(got, reference.encode(TEXTS), strict=True):
        assert mine.dense is not None
        assert mine.colbert is not None
        assert mine.sparse is not None
        np.testing.assert_allclose(mine.dense, ref.dense, atol=2e-5)
        np.testing.assert_allclose(mine.colbert, ref.colbert, atol=2e-5)
        token_ids, weights = mine.sparse
        assert set(token_ids.tolist()) == set(ref.sparse)
        for token, weight in zip(token_ids.tolist(), weights.tolist(), strict=True):
            assert weight == pytest.approx(ref.sparse[token], abs=2e-5)


def test_a_bert_cross_encoder_scores_pairs_as_on_torch(
    bundled_source: ModelSource, tmp_path: Path, conversions: Conversions
) -> None:
    """A pair's token type ids reach the compiled model (the encoder knows its
    architecture without the torch model): the logits equal torch fp32's."""
    source = resolve_model(
        str(build_tiny_bert_cross_encoder(tmp_path / "bert", bundled_source.path))
    )
    on_torch = load_encoder(source, dtype="fp32", threads=2)
    assert on_torch.has_segments
    compiled = _openvino(source, conversions(source, "fp32"), "fp32")
    assert compiled.has_segments
    ids = on_torch.pair_ids("what do cats eat", ["cats eat fish", "dogs bark", "a long day"])
    want = np.array([e.score for e in on_torch.forward(ids, SCORE)], dtype=float)
    got = np.array([e.score for e in compiled.forward(ids, SCORE)], dtype=float)
    assert len(set(want.tolist())) == 3
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_two_processes_starting_together_convert_once_and_reuse_the_cache(
    bundled_source: ModelSource, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two loads that find no conversion (sibling processes starting together: hypercorn
    workers, Ray actors on a node) convert once: the second waits on the host-wide lock and
    compiles the first one's files. A later load compiles the cached files without
    converting (a leftover half-written staging directory changes nothing); the cache is
    keyed by the served dtype."""
    settings = Settings(model="bundled", dtype="fp32", backend="openvino", cache_dir=tmp_path)
    directory = openvino_directory(settings, bundled_source)
    steps: list[list[str]] = [[], []]
    waiting = [threading.Event(), threading.Event()]
    loaded: list[Encoder] = []

    def start(i: int) -> None:
        def step(name: str) -> None:
            steps[i].append(name)
            waiting[i].set()

        loaded.append(load_model(settings, bundled_source, threads=1, on_step=step))

    with caplog.at_level(logging.INFO, logger="bge_trio"):
        starts = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        with ov_backend.conversion_lock(directory):  # held until both want to convert
            for thread in starts:
                thread.start()
            assert all(event.wait(120) for event in waiting)
        for thread in starts:
            thread.join(300)
    assert all("converting" in s[0] and "compiling" in s[-1] for s in steps)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if " to OpenVINO in " in m]) == 1
    assert len([m for m in messages if "another process converted it" in m]) == 1
    assert ov_backend.converted(directory)
    written = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    (directory.parent / f"{directory.name}.tmp-1").mkdir()  # a crashed conversion's leftover
    later: list[str] = []
    second = load_model(settings, bundled_source, threads=2, on_step=later.append)
    assert later == ["compiling the OpenVINO model"]
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == written
    ids = second.tokenize(TEXTS)
    expected = [e.dense for e in second.forward(ids)]
    for first in loaded:
        np.testing.assert_array_equal([e.dense for e in first.forward(ids)], expected)
    assert openvino_directory(attrs.evolve(settings, dtype="bf16"), bundled_source) != directory


def test_a_pass_nobody_waits_for_is_cancelled_and_the_model_serves_on(
    bundled_source: ModelSource, corpus_ids: list[list[int]], conversions: Conversions
) -> None:
    """The waiting thread asks the hook while the pass runs; when it stops the pass, the
    request is cancelled, and the next pass (of another shape: OpenVINO's CPU plugin fails
    that after a cancel unless the model is compiled again) gives the vectors it gave before."""
    encoder = _openvino(bundled_source, conversions(bundled_source, "fp32"), "fp32")
    batch = (corpus_ids * 4)[:256]
    asked = []

    def stop_on_second_call() -> None:
        asked.append(1)
        if len(asked) == 2:
            raise PassAbandoned

    expected = encoder.forward(batch[:4])
    with pytest.raises(PassAbandoned):
        encoder.forward(batch, between_layers=stop_on_second_call)
    assert len(asked) == 2
    again = encoder.forward(batch[:4])
    np.testing.assert_array_equal([e.dense for e in again], [e.dense for e in expected])


def test_an_express_pass_runs_beside_a_regular_one(
    bundled_source: ModelSource, corpus_ids: list[list[int]], conversions: Conversions
) -> None:
    """The express lane's compiled model is its own: an express pass starts and ends while
    a regular pass is still running (one compiled model runs one request at a time)."""
    encoder = _openvino(bundled_source, conversions(bundled_source, "fp32"), "fp32", express=1)
    running = threading.Event()
    ended_first: list[str] = []

    def regular_hook() -> None:
        running.set()

    def regular() -> None:
        encoder.forward(corpus_ids[:64], between_layers=regular_hook)
        ended_first.append("regular")

    thread = threading.Thread(target=regular)
    thread.start()
    assert running.wait(60)
    (short,) = encoder.forward([corpus_ids[0][:12]], express=True)
    ended_first.append("express")
    thread.join(120)
    assert ended_first == ["express", "regular"]
    (alone,) = encoder.forward([corpus_ids[0][:12]])
    np.testing.assert_allclose(short.dense, alone.dense, atol=1e-6)  # type: ignore[arg-type]


async def test_a_server_on_openvino_answers_short_queries_on_its_express_lane(
    bundled_source: ModelSource, settings_for: Any, conversions: Conversions
) -> None:
    """While a long pass holds the regular lane, a short query is answered on the express
    lane (OpenVINO's second compiled model); both answers equal the torch server's."""
    armed, long_running, release = threading.Event(), threading.Event(), threading.Event()

    def hold_long(batch: Sequence[Sequence[int]]) -> None:
        if armed.is_set() and max(len(ids) for ids in batch) > 100:  # not the probe's
            long_running.set()
            release.wait(60)

    settings = seed_openvino(
        conversions(bundled_source, "fp32"),
        settings_for("bundled", backend="openvino", probe="auto"),
        bundled_source,
    )
    long_text = "a long passage about structured concurrency " * 40
    async with running_server(settings, load_encoder=loader_with(hold_long)) as server:
        assert (await server.client.get("/info")).json()["backend"] == "openvino"
        armed.set()
        results: dict[str, Any] = {}

        async def post(name: str, text: str) -> None:
            body = {"input": [text], "model": "x"}
            results[name] = await server.client.post("/v1/embeddings", json=body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, "long", long_text)
            await trio.to_thread.run_sync(long_running.wait)
            await post("short", "a short query")
            assert results["short"].status_code == 200
            assert server.scheduler.statistics().express_passes == 1
            release.set()
        assert results["long"].status_code == 200
    async with running_server(settings_for("bundled")) as torch_server:
        for name, text in (("long", long_text), ("short", "a short query")):
            body = {"input": [text], "model": "x"}
            want = (await torch_server.client.post("/v1/embeddings", json=body)).json()
            got = results[name].json()["data"][0]["embedding"]
            np.testing.assert_allclose(got, want["data"][0]["embedding"], atol=1e-5)


@pytest.mark.alone
def test_a_probe_on_openvino_measures_openvino(
    bundled_source: ModelSource, tmp_path: Path, conversions: Conversions
) -> None:
    """The probe runs the compiled model (its two-layer copy), and its cache is keyed by
    the backend: torch's cached fit is not OpenVINO's."""
    settings = Settings(
        model="bundled",
        dtype="fp32",
        backend="openvino",
        probe="auto",
        cache_dir=tmp_path,
        memory_limit_bytes=3 << 30,
    )
    seed_openvino(conversions(bundled_source, "fp32"), settings, bundled_source)
    served = prepare(settings, bundled_source, threads=2, workers=1)
    assert served.memory.status == "complete", served.memory.detail
    assert served.memory.cache_key is not None
    assert served.memory.cache_key.fields["backend"].startswith("openvino ")
    # its two-layer passes, scaled to full depth, are the first pace: a full-depth pass
    # of the same shape takes about as long (a wrong depth is off by several times)
    batch, seq, predicted = served.memory.pass_seconds[0]
    forward = synthetic_forward(served.encoder)
    took = []
    for _ in range(2):
        started = time.perf_counter()
        forward(batch, seq)
        took.append(time.perf_counter() - started)
    assert 0.5 < predicted / min(took) < 2.0, (predicted, took)
    on_torch = prepare(
        attrs.evolve(settings, backend="torch"), bundled_source, threads=2, workers=1
    )
    assert on_torch.memory.status == "complete"  # a probe of its own, not openvino's cache hit


def test_auto_measures_once_and_keeps_its_choice(
    bundled_source: ModelSource, tmp_path: Path, conversions: Conversions
) -> None:
    """``auto`` times both backends on its first start, records the faster, and a later
    start loads the recorded one without measuring again."""
    settings = Settings(
        model="bundled",
        dtype="fp32",
        backend="auto",
        cache_dir=tmp_path,
        memory_limit_bytes=8 << 30,
    )
    seed_openvino(conversions(bundled_source, "fp32"), settings, bundled_source)
    first = load_model(settings, bundled_source, threads=2)
    choice_file = openvino_directory(settings, bundled_source) / CHOICE_FILE
    choice = json.loads(choice_file.read_text())
    faster = all(o < t for o, t in zip(choice["openvino_s"], choice["torch_s"], strict=True))
    assert choice["backend"] == first.backend == ("openvino" if faster else "torch")
    flipped = "torch" if first.backend == "openvino" else "openvino"
    choice_file.write_text(json.dumps({**choice, "backend": flipped}))
    assert load_model(settings, bundled_source, threads=2).backend == flipped


def test_auto_stays_on_torch_where_a_second_copy_does_not_fit(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    # above what this process holds now (other tests' models too, in a run of many) by
    # the headroom and one copy of the weights: once the torch model is loaded, less is
    # left than two compiled copies and the headroom
    weights = (bundled_source.path / "model.safetensors").stat().st_size
    settings = Settings(
        model="bundled",
        dtype="fp32",
        backend="auto",
        cache_dir=tmp_path,
        memory_limit_bytes=resident_bytes() + Settings().memory_headroom_bytes + weights,
    )
    assert load_model(settings, bundled_source, threads=2).backend == "torch"
    assert not (openvino_directory(settings, bundled_source) / CHOICE_FILE).exists()


def test_openvino_s_express_lane_takes_queries_only() -> None:
    assert express_tokens(Settings(backend="openvino")) == OPENVINO_EXPRESS_TOKENS == 64
    assert express_tokens(Settings(backend="openvino", express_tokens=0)) == 0
    assert express_tokens(Settings(backend="torch")) == 256


def test_settings_refuse_what_openvino_cannot_do() -> None:
    with pytest.raises(ConfigError, match="WORKERS"):
        Settings.from_env({"BGE_TRIO_BACKEND": "openvino", "BGE_TRIO_WORKERS": "2"})
    with pytest.raises(ConfigError, match="BACKEND"):
        Settings.from_env({"BGE_TRIO_BACKEND": "tensorrt"})


def test_health_says_what_loading_does() -> None:
    body = health(_loading_stats("converting the transformer to OpenVINO"))
    assert body == {
        "status": "loading",
        "loading_step": "converting the transformer to OpenVINO",
    }


def _loading_stats(step: str) -> EngineStatistics:
    fields: dict[str, Any] = {f.name: None for f in attrs.fields(EngineStatistics)}
    return EngineStatistics(**{**fields, "state": Loading(step), "draining": False})


def test_bulk_embed_on_openvino_gives_the_reference_outputs(
    tmp_path: Path,
    tiny_model_dir: Path,
    reference: ReferenceM3,
    bge_trio_here: RunHere,
    conversions: Conversions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``bge-trio embed`` takes the backend from the environment like the server (and
    the conversion from its cache)."""
    tiny = resolve_model(str(tiny_model_dir))
    settings = Settings(model=str(tiny_model_dir), dtype="fp32", cache_dir=tmp_path / "cache")
    seed_openvino(conversions(tiny, "fp32"), settings, tiny)
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(9)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    env = env_for(tmp_path, dtype="fp32", BGE_TRIO_BACKEND="openvino")
    command = ["embed", str(source), str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    command += ["--outputs", "dense,sparse,colbert", "--shard-rows", "4"]
    with caplog.at_level(logging.INFO):
        ran = bge_trio_here(command, env)
    assert ran.code == 0, ran.stderr
    assert "(backend openvino," in caplog.text
    meta = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"bge_trio"])["backend"] == "openvino"
    rows = sorted(
        pq.ParquetDataset(str(tmp_path / "out")).read().to_pylist(), key=lambda r: r["id"]
    )
    assert [r["id"] for r in rows] == list(range(9))
    for row, ref in zip(rows, reference.encode(texts), strict=True):
        np.testing.assert_allclose(row["dense"], ref.dense, atol=2e-5)
        np.testing.assert_allclose(row["colbert"], ref.colbert, atol=2e-5)
        assert row["sparse_ids"] == sorted(ref.sparse)
