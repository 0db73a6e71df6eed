"""Semantics on the bundled all-MiniLM-L6-v2, and agreement with sentence-transformers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from bge_trio.model.source import ModelSource
from tests.conftest import Server, running_server

SENTENCES = [
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "The stock market fell sharply after the interest rate decision.",
]


@pytest.fixture
async def bundled_server(bundled_source: ModelSource, settings_for: Any) -> AsyncIterator[Server]:
    async with running_server(settings_for("bundled")) as server:
        yield server


async def test_cat_is_closer_to_kitten_than_to_stocks(bundled_server: Server) -> None:
    r = await bundled_server.client.post("/v1/embeddings", json={"input": SENTENCES})
    cat, kitten, stocks = (np.array(d["embedding"]) for d in r.json()["data"])
    assert cat @ kitten > 0.5
    assert cat @ kitten > cat @ stocks + 0.3


async def test_matches_sentence_transformers(
    bundled_server: Server, bundled_source: ModelSource
) -> None:
    import trio
    from sentence_transformers import SentenceTransformer

    def encode() -> np.ndarray:
        model = SentenceTransformer(str(bundled_source.path), device="cpu")
        return model.encode(SENTENCES, normalize_embeddings=True)

    expected = await trio.to_thread.run_sync(encode)
    r = await bundled_server.client.post("/v1/embeddings", json={"input": SENTENCES})
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_dense_only_model_refuses_sparse_and_colbert(bundled_server: Server) -> None:
    for path in ("/v1/sparse-embeddings", "/v1/colbert-embeddings", "/v1/embeddings:both"):
        r = await bundled_server.client.post(path, json={"input": "a"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "output_not_supported"
    models = (await bundled_server.client.get("/v1/models")).json()
    assert models["data"][0]["outputs"] == ["dense"]
