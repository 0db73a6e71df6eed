"""/v1/rerank: the rerank APIs' shape, scored by the hybrid score of /v1/score."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cohere
import pytest
import trio

from tests.conftest import Server, running_server
from tests.reference import ReferenceM3, colbert_score
from tests.test_retrieval import DOCUMENTS

QUERY = "where does the cat sleep"


async def _score(server: Server, **extra: Any) -> list[dict[str, Any]]:
    r = await server.client.post(
        "/v1/score", json={"queries": QUERY, "documents": DOCUMENTS, **extra}
    )
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["data"][0]["results"]
    return results


async def _rerank(server: Server, **body: Any) -> dict[str, Any]:
    r = await server.client.post("/v1/rerank", json={"query": QUERY, **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def test_rerank_ranks_by_the_hybrid_score_of_v1_score(tiny_server: Server) -> None:
    scored = await _score(tiny_server)
    answer = await _rerank(tiny_server, documents=DOCUMENTS)
    assert answer["object"] == "rerank"
    assert answer["id"].startswith("rerank-")
    assert answer["model"] == tiny_server.engine.name
    results = answer["results"]
    assert [r["index"] for r in results] == [s["index"] for s in scored]
    for result, want in zip(results, scored, strict=True):
        assert set(result) == {"index", "relevance_score"}
        assert result["relevance_score"] == pytest.approx(want["score"], abs=1e-6)
    score_usage = (
        await tiny_server.client.post("/v1/score", json={"queries": QUERY, "documents": DOCUMENTS})
    ).json()["usage"]
    assert answer["usage"] == score_usage


async def test_top_n_and_documents_as_strings_or_text_objects(tiny_server: Server) -> None:
    full = (await _rerank(tiny_server, documents=DOCUMENTS))["results"]
    objects = [{"text": d, "title": "ignored"} for d in DOCUMENTS]
    best = await _rerank(tiny_server, documents=objects, top_n=2, return_documents=True)
    assert [r["index"] for r in best["results"]] == [r["index"] for r in full[:2]]
    for result, want in zip(best["results"], full[:2], strict=True):
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
        assert result["relevance_score"] == pytest.approx(want["relevance_score"], abs=1e-6)


async def test_weights_per_request_change_the_score(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    answer = await _rerank(tiny_server, documents=DOCUMENTS, weights=[0, 0, 1])
    q = reference.encode([QUERY])[0]
    d = reference.encode(DOCUMENTS)
    for result in answer["results"]:
        want = colbert_score(q.colbert, d[result["index"]].colbert)
        assert result["relevance_score"] == pytest.approx(want, abs=1e-5)


@pytest.fixture
async def colbert_weighted_server(tiny_model_dir: Path, settings_for: Any) -> AsyncIterator[Server]:
    settings = settings_for(tiny_model_dir, score_weights=(0.0, 0.0, 1.0), max_score_pairs=4)
    async with running_server(settings) as server:
        yield server


async def test_the_server_default_weights_apply_to_rerank_and_score(
    colbert_weighted_server: Server, reference: ReferenceM3
) -> None:
    server = colbert_weighted_server
    q = reference.encode([QUERY])[0]
    d = reference.encode(DOCUMENTS)
    reranked = (await _rerank(server, documents=DOCUMENTS))["results"]
    scored = await _score(server)
    for result, score in zip(reranked, scored, strict=True):
        want = colbert_score(q.colbert, d[result["index"]].colbert)
        assert result["relevance_score"] == pytest.approx(want, abs=1e-5)
        assert score["score"] == pytest.approx(want, abs=1e-5)
    # a request's own weights replace the server's
    dense = (await _rerank(server, documents=DOCUMENTS, weights=[1, 0, 0]))["results"]
    assert dense[0]["relevance_score"] == pytest.approx(
        max(float(q.dense @ x.dense) for x in d), abs=1e-5
    )


async def test_more_documents_than_the_pair_limit_is_the_same_400_as_score(
    colbert_weighted_server: Server,
) -> None:
    documents = [*DOCUMENTS, "one too many"]
    rerank = await colbert_weighted_server.client.post(
        "/v1/rerank", json={"query": QUERY, "documents": documents}
    )
    score = await colbert_weighted_server.client.post(
        "/v1/score", json={"queries": QUERY, "documents": documents}
    )
    assert rerank.status_code == score.status_code == 400
    assert rerank.json() == score.json()
    assert rerank.json()["error"]["code"] == "too_many_pairs"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"documents": ["x"]}, "invalid_input", "query"),
        ({"query": ["a"], "documents": ["x"]}, "invalid_input", "query"),
        ({"query": "a", "documents": "x"}, "invalid_input", "documents"),
        ({"query": "a", "documents": [{"title": "x"}]}, "invalid_input", "documents"),
        ({"query": "a", "documents": []}, "empty_input", "documents"),
        ({"query": "a", "documents": ["x"], "top_n": 0}, "invalid_top_n", "top_n"),
        ({"query": "a", "documents": ["x"], "weights": [0, 0, 0]}, "invalid_weights", "weights"),
    ],
)
async def test_rerank_bad_input(
    tiny_server: Server, body: dict[str, Any], code: str, param: str
) -> None:
    r = await tiny_server.client.post("/v1/rerank", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


async def test_the_cohere_client_reranks_against_the_server(tiny_server: Server) -> None:
    """A real rerank client library, unmodified, pointed at the server."""
    client = cohere.Client(base_url=tiny_server.url, api_key="unused", timeout=60)

    def rerank() -> Any:
        return client.rerank(
            model="bge-m3", query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True
        )

    answer = await trio.to_thread.run_sync(rerank)
    full = (await _rerank(tiny_server, documents=DOCUMENTS))["results"]
    assert [(r.index, r.relevance_score) for r in answer.results] == [
        (r["index"], pytest.approx(r["relevance_score"], abs=1e-6)) for r in full[:3]
    ]
    assert [r.document.text for r in answer.results] == [DOCUMENTS[r.index] for r in answer.results]


@pytest.mark.parametrize(
    ("weights", "same_as"),
    [
        ([5e-324, 0, 0], [1, 0, 0]),
        ([1e308, 1e308, 1e308], [1, 1, 1]),
        ([0, 1e-300, 3e-300], [0, 1, 3]),
    ],
)
async def test_weights_keep_their_ratio_however_small_or_large(
    tiny_server: Server, weights: list[float], same_as: list[float]
) -> None:
    got = (await _rerank(tiny_server, documents=DOCUMENTS, weights=weights))["results"]
    want = (await _rerank(tiny_server, documents=DOCUMENTS, weights=same_as))["results"]
    assert [(r["index"], r["relevance_score"]) for r in got] == [
        (r["index"], pytest.approx(r["relevance_score"], abs=1e-6)) for r in want
    ]
