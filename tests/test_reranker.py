"""A cross-encoder reranker beside BGE-M3 in one server: its scores against the reference
(FlagReranker's algorithm written out, and sentence-transformers' CrossEncoder) through
the Cohere SDK and TEI's shape, routing by ``model``, and what each route answers a model
that cannot serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cohere
import numpy as np
import pytest
import torch
import trio

from tests.conftest import SettingsFactory, running_server
from tests.reference import ReferenceM3, ReferenceReranker, sigmoid

QUERY = "a cat sleeps on the warm windowsill"
DOCUMENTS = [
    "A cat sleeps on the warm windowsill while a kitten plays.",
    "Stock markets fell sharply as investors worried about interest rates.",
    "The quick brown fox jumps over the lazy dog.",
    "Le chat dort sur le rebord de la fenetre.",
    "embedding servers turn text into vectors " * 120,  # past the 512-token pair: cut
]


def _two_models(tiny_model_dir: Path, tiny_reranker_dir: Path) -> str:
    return f"m3={tiny_model_dir},reranker={tiny_reranker_dir}"


async def test_cross_encoder_scores_equal_the_reference_through_cohere_and_tei(
    tiny_model_dir: Path,
    tiny_reranker_dir: Path,
    reference_reranker: ReferenceReranker,
    settings_for: SettingsFactory,
) -> None:
    expected = reference_reranker.logits(QUERY, DOCUMENTS)
    assert max(expected) - min(expected) > 1e-3  # the scores tell the documents apart
    settings = settings_for(_two_models(tiny_model_dir, tiny_reranker_dir))
    async with running_server(settings) as server:

        def through_cohere() -> Any:
            client = cohere.ClientV2(api_key="unused", base_url=server.url)
            return client.rerank(model="reranker", query=QUERY, documents=DOCUMENTS)

        answer = await trio.to_thread.run_sync(through_cohere)
        assert len(answer.results) == len(DOCUMENTS)
        got = {result.index: result.relevance_score for result in answer.results}
        for index, logit in enumerate(expected):
            assert got[index] == pytest.approx(sigmoid(logit), abs=1e-4)
        ranked = [result.index for result in answer.results]
        assert ranked == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])

        # the same body without a model: the server's cross-encoder reranks it
        body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": True}
        plain = (await server.client.post("/v1/rerank", json=body)).json()
        assert plain["model"] == "reranker"
        assert [r["index"] for r in plain["results"]] == ranked[:2]
        for result in plain["results"]:
            assert result["raw_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
            assert result["document"] == {"text": DOCUMENTS[result["index"]]}

        # TEI's shape: sigmoid scores by default, logits with raw_scores
        tei = {"query": QUERY, "texts": DOCUMENTS, "return_text": True}
        for raw in (False, True):
            r = await server.client.post("/rerank", json={**tei, "raw_scores": raw})
            assert r.status_code == 200, r.text
            results = r.json()
            assert [item["index"] for item in results] == ranked
            for item in results:
                logit = expected[item["index"]]
                want = logit if raw else sigmoid(logit)
                assert item["score"] == pytest.approx(want, abs=1e-4)
                assert item["text"] == DOCUMENTS[item["index"]]


async def test_cross_encoder_equals_sentence_transformers(
    tiny_reranker_dir: Path, settings_for: SettingsFactory
) -> None:
    """sentence-transformers' CrossEncoder with the same weights (pairs within the
    longest input, where its truncation and FlagReranker's agree)."""
    from sentence_transformers import CrossEncoder

    short = DOCUMENTS[:4]
    crossing = CrossEncoder(str(tiny_reranker_dir), device="cpu")
    logits = crossing.predict(
        [(QUERY, doc) for doc in short], activation_fn=torch.nn.Identity(), batch_size=2
    )
    async with running_server(settings_for(tiny_reranker_dir)) as server:
        body = {"query": QUERY, "texts": short, "raw_scores": True}
        results = (await server.client.post("/rerank", json=body)).json()
    got = {item["index"]: item["score"] for item in results}
    np.testing.assert_allclose([got[i] for i in range(len(short))], logits, atol=1e-4)


async def test_each_route_serves_the_models_that_can_and_names_them_otherwise(
    tiny_model_dir: Path,
    tiny_reranker_dir: Path,
    reference: ReferenceM3,
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(_two_models(tiny_model_dir, tiny_reranker_dir))
    async with running_server(settings) as server:
        client = server.client
        models = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["kind"]) for m in models] == [
            ("m3", "embedding"),
            ("reranker", "reranker"),
        ]
        assert models[0]["dimension"] == 32
        assert "labels" not in models[0]
        assert models[1]["labels"] == 1
        assert "dimension" not in models[1]
        assert models[1]["max_seq_length"] == 512  # FlagReranker's default pair length

        health = await client.get("/health")
        assert health.status_code == 200
        assert {name: m["status"] for name, m in health.json()["models"].items()} == {
            "m3": "ok",
            "reranker": "ok",
        }

        # embeddings: the embedder, named or not; the cross-encoder is a 400 naming it
        r = await client.post("/v1/embeddings", json={"input": ["a cat"]})
        assert r.status_code == 200
        assert r.json()["model"] == "m3"
        np.testing.assert_allclose(
            r.json()["data"][0]["embedding"], reference.encode(["a cat"])[0].dense, atol=1e-5
        )
        for route, asked in [
            ("/v1/embeddings", {"input": ["a cat"]}),
            ("/v1/sparse-embeddings", {"input": ["a cat"]}),
            ("/v1/score", {"queries": ["a cat"], "documents": ["a dog"]}),
        ]:
            r = await client.post(route, json={**asked, "model": "reranker"})
            assert r.status_code == 400, (route, r.text)
            error = r.json()["error"]
            assert error["code"] == "model_not_supported"
            assert error["param"] == "model"
            assert "'reranker'" in error["message"]
            assert "m3" in error["message"]

        # /v1/rerank naming the embedder: BGE-M3's hybrid score, as /v1/score gives it
        body = {"query": "a cat", "documents": ["a cat sleeps", "stock markets"]}
        hybrid = (await client.post("/v1/rerank", json={**body, "model": "m3"})).json()
        score_body = {"queries": ["a cat"], "documents": body["documents"], "model": "m3"}
        scored = (await client.post("/v1/score", json=score_body)).json()
        want = {r["index"]: r["score"] for r in scored["data"][0]["results"]}
        assert hybrid["model"] == "m3"
        for result in hybrid["results"]:
            assert result["relevance_score"] == pytest.approx(want[result["index"]], abs=1e-6)
            assert "raw_score" not in result

        unknown = await client.post("/v1/rerank", json={**body, "model": "nope"})
        assert unknown.status_code == 400
        assert "m3, reranker" in unknown.json()["error"]["message"]


async def test_a_server_of_one_cross_encoder_refuses_embeddings_by_name(
    tiny_reranker_dir: Path, settings_for: SettingsFactory
) -> None:
    async with running_server(settings_for(tiny_reranker_dir)) as server:
        r = await server.client.post("/v1/embeddings", json={"input": ["a cat"]})
        assert r.status_code == 400
        assert "no model served here can" in r.json()["error"]["message"]
        tokens = await server.client.post("/tokenize", json={"inputs": "a cat"})
        assert tokens.status_code == 200


async def test_rerank_request_errors_are_in_the_client_s_shape(
    tiny_reranker_dir: Path, settings_for: SettingsFactory
) -> None:
    async with running_server(settings_for(tiny_reranker_dir)) as server:
        for route, body in [
            ("/rerank", {"query": "a", "texts": 3}),
            ("/rerank", {"texts": ["a"]}),
            ("/v1/rerank", {"query": "a", "documents": [1]}),
            ("/rerank", {"query": "a", "texts": ["b"], "raw_scores": "yes"}),
        ]:
            r = await server.client.post(route, json=body)
            assert r.status_code == 400, (route, body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        assert (await server.client.get("/health")).status_code == 200


async def test_a_bf16_cross_encoder_scores_near_the_fp32_reference(
    tiny_reranker_dir: Path,
    reference_reranker: ReferenceReranker,
    settings_for: SettingsFactory,
) -> None:
    """bf16 weights and activations (emulated where the CPU lacks native bf16), the
    logits pooled in fp32."""
    expected = reference_reranker.logits(QUERY, DOCUMENTS)
    async with running_server(settings_for(tiny_reranker_dir, dtype="bf16")) as server:
        info = (await server.client.get("/info")).json()
        assert info["dtype"] == "bf16"
        body = {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}
        results = (await server.client.post("/rerank", json=body)).json()
    got = {item["index"]: item["score"] for item in results}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], expected, atol=0.05)
