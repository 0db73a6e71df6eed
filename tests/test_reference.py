"""The server's dense, sparse and ColBERT outputs equal an independent implementation."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import trio

from tests.conftest import Server
from tests.reference import ReferenceM3, assert_dense_answer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores, and the cat agrees.",
    "",
]


def _b64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


async def test_dense_matches_reference(tiny_server: Server, reference: ReferenceM3) -> None:
    r = await tiny_server.client.post("/v1/embeddings", json={"input": TEXTS})
    assert_dense_answer(r, reference, TEXTS)
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == tiny_server.engine.name


async def test_sparse_matches_reference(tiny_server: Server, reference: ReferenceM3) -> None:
    r = await tiny_server.client.post(
        "/v1/sparse-embeddings", json={"input": TEXTS, "return_tokens": True}
    )
    assert r.status_code == 200
    for item, ref in zip(r.json()["data"], reference.encode(TEXTS), strict=True):
        assert item["object"] == "sparse_embedding"
        values = item["sparse_values"]
        lexical = ref.sparse
        assert values["indices"] == sorted(lexical)
        np.testing.assert_allclose(
            values["values"], [lexical[i] for i in values["indices"]], atol=1e-5
        )
        assert values["tokens"] == [reference.tokenizer.id_to_token(i) for i in values["indices"]]


async def test_colbert_matches_reference(tiny_server: Server, reference: ReferenceM3) -> None:
    for fmt in ("float", "base64"):
        r = await tiny_server.client.post(
            "/v1/colbert-embeddings", json={"input": TEXTS, "encoding_format": fmt}
        )
        assert r.status_code == 200
        for item, ref in zip(r.json()["data"], reference.encode(TEXTS), strict=True):
            vectors = item["embeddings"]
            got = np.array([_b64(v) for v in vectors]) if fmt == "base64" else np.array(vectors)
            colbert = ref.colbert
            assert got.shape == colbert.shape
            np.testing.assert_allclose(got, colbert, atol=1e-5)


@pytest.mark.parametrize("path", ["/v1/embeddings:both", "/v1/embeddings%3Aboth"])
async def test_both_from_one_pass(tiny_server: Server, reference: ReferenceM3, path: str) -> None:
    r = await tiny_server.client.post(path, json={"input": TEXTS[:2]})
    assert r.status_code == 200
    for item, ref in zip(r.json()["data"], reference.encode(TEXTS[:2]), strict=True):
        np.testing.assert_allclose(item["embedding"], ref.dense, atol=1e-5)
        lexical = ref.sparse
        assert item["sparse_values"]["indices"] == sorted(lexical)


async def test_base64_decodes_to_the_same_floats(tiny_server: Server) -> None:
    floats = await tiny_server.client.post("/v1/embeddings", json={"input": TEXTS[:2]})
    packed = await tiny_server.client.post(
        "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}
    )
    for f, p in zip(floats.json()["data"], packed.json()["data"], strict=True):
        assert isinstance(p["embedding"], str)
        np.testing.assert_array_equal(_b64(p["embedding"]), np.array(f["embedding"], "<f4"))


async def test_dimensions_cuts_and_renormalises(tiny_server: Server) -> None:
    full = (await tiny_server.client.post("/v1/embeddings", json={"input": "a cat"})).json()
    cut = (
        await tiny_server.client.post("/v1/embeddings", json={"input": "a cat", "dimensions": 8})
    ).json()
    vector = np.array(full["data"][0]["embedding"])
    short = np.array(cut["data"][0]["embedding"])
    assert short.shape == (8,)
    np.testing.assert_allclose(short, vector[:8] / np.linalg.norm(vector[:8]), atol=1e-6)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)


async def test_token_id_input_equals_text_input(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    ids = [reference.ids(text) for text in TEXTS[:2]]
    by_text = (await tiny_server.client.post("/v1/embeddings", json={"input": TEXTS[:2]})).json()
    by_ids = (await tiny_server.client.post("/v1/embeddings", json={"input": ids})).json()
    single = (await tiny_server.client.post("/v1/embeddings", json={"input": ids[0]})).json()
    for t, i in zip(by_text["data"], by_ids["data"], strict=True):
        np.testing.assert_allclose(t["embedding"], i["embedding"], atol=1e-6)
    np.testing.assert_allclose(
        single["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6
    )
    assert by_ids["usage"]["prompt_tokens"] == sum(len(x) for x in ids)


async def test_concurrent_requests_each_get_their_own_answer(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    texts = [f"request {i} says the fox {'jumps ' * (i % 7)}" for i in range(24)]
    expected = reference.encode(texts)
    got: dict[int, list[float]] = {}

    async def one(i: int) -> None:
        r = await tiny_server.client.post("/v1/embeddings", json={"input": texts[i]})
        assert r.status_code == 200
        got[i] = r.json()["data"][0]["embedding"]

    async with trio.open_nursery() as nursery:
        for i in range(len(texts)):
            nursery.start_soon(one, i)
    for i, ref in enumerate(expected):
        np.testing.assert_allclose(got[i], ref.dense, atol=1e-5)


async def test_models_health_live_info(tiny_server: Server) -> None:
    client = tiny_server.client
    models = (await client.get("/v1/models")).json()
    (model,) = models["data"]
    assert model["id"] == tiny_server.engine.name
    assert model["dimension"] == 32
    assert model["max_seq_length"] == 512
    assert model["outputs"] == ["colbert", "dense", "sparse"]
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert (await client.get("/live")).json() == {"status": "alive"}
    info = (await client.get("/info")).json()
    assert info["memory"]["probe_status"] == "disabled"
    assert info["dimension"] == 32


async def test_openai_sdk_round_trip(tiny_server: Server) -> None:
    from openai import OpenAI

    def call() -> tuple[list[list[float]], int]:
        client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
        response = client.embeddings.create(model="whatever", input=TEXTS[:3])
        return [d.embedding for d in response.data], response.usage.prompt_tokens

    vectors, tokens = await trio.to_thread.run_sync(call)
    plain = (await tiny_server.client.post("/v1/embeddings", json={"input": TEXTS[:3]})).json()
    assert tokens == plain["usage"]["prompt_tokens"]
    for v, p in zip(vectors, plain["data"], strict=True):
        np.testing.assert_allclose(v, p["embedding"], atol=1e-6)
