"""/v1/score (hybrid dense + sparse + ColBERT), /tokenize and /decode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from bge_trio.model.source import ModelSource
from tests.conftest import Server, running_server
from tests.reference import (
    ReferenceM3,
    assert_dense_answer,
    colbert_score,
    dense_score,
    sparse_score,
)

QUERIES = ["what does the fox do", "cats and kittens"]
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps on the warm windowsill while a kitten plays.",
    "Stock markets fell sharply as investors worried about interest rates.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores.",
]


def _expected(reference: ReferenceM3, weights: list[float]) -> list[dict[int, dict[str, float]]]:
    q = reference.encode(QUERIES)
    d = reference.encode(DOCUMENTS)
    wd, ws, wc = weights
    out = []
    for qi in range(len(QUERIES)):
        per_doc = {}
        for di in range(len(DOCUMENTS)):
            dense = dense_score(q[qi].dense, d[di].dense)
            sparse = sparse_score(q[qi].sparse, d[di].sparse)
            colbert = colbert_score(q[qi].colbert, d[di].colbert)
            per_doc[di] = {
                "dense": dense,
                "sparse": sparse,
                "colbert": colbert,
                "sparse+dense": (sparse * ws + dense * wd) / (ws + wd),
                "colbert+sparse+dense": (colbert * wc + sparse * ws + dense * wd) / (wc + ws + wd),
            }
        out.append(per_doc)
    return out


@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4]])
async def test_scores_equal_the_reference(
    tiny_server: Server, reference: ReferenceM3, weights: list[float] | None
) -> None:
    body: dict[str, Any] = {"queries": QUERIES, "documents": DOCUMENTS}
    if weights is not None:
        body["weights"] = weights
    r = await tiny_server.client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["modes"] == ["dense", "sparse", "colbert"]
    expected = _expected(reference, weights or [1.0, 1.0, 1.0])
    for qi, item in enumerate(answer["data"]):
        assert item["index"] == qi
        assert item["query"] == QUERIES[qi]
        assert sorted(r["index"] for r in item["results"]) == list(range(len(DOCUMENTS)))
        hybrid = [r["score"] for r in item["results"]]
        assert hybrid == sorted(hybrid, reverse=True)
        for result in item["results"]:
            want = expected[qi][result["index"]]
            for name, value in want.items():
                assert result[name] == pytest.approx(value, abs=1e-5), name
            assert result["score"] == pytest.approx(want["colbert+sparse+dense"], abs=1e-5)
    tokens = sum(x.tokens for x in reference.encode(QUERIES + DOCUMENTS))
    assert answer["usage"]["prompt_tokens"] == tokens


async def test_top_n_keeps_the_best_n_in_order_with_their_documents(tiny_server: Server) -> None:
    full = await tiny_server.client.post(
        "/v1/score", json={"queries": "fox", "documents": DOCUMENTS}
    )
    ranking = full.json()["data"][0]["results"]
    scores = [result["score"] for result in ranking]
    assert scores == sorted(scores, reverse=True)
    assert sorted(result["index"] for result in ranking) == list(range(len(DOCUMENTS)))
    r = await tiny_server.client.post(
        "/v1/score",
        json={"queries": "fox", "documents": DOCUMENTS, "top_n": 2, "return_documents": True},
    )
    (item,) = r.json()["data"]
    assert [(x["index"], x["score"]) for x in item["results"]] == [
        (x["index"], x["score"]) for x in ranking[:2]
    ]
    for result in item["results"]:
        assert result["document"] == DOCUMENTS[result["index"]]
    assert all("document" not in result for result in ranking)


@pytest.fixture
async def bundled_server(settings_for: Any) -> AsyncIterator[Server]:
    async with running_server(settings_for("bundled")) as server:
        yield server


async def test_dense_only_model_ranks_the_relevant_document_first(bundled_server: Server) -> None:
    r = await bundled_server.client.post(
        "/v1/score",
        json={"queries": ["Where is the kitten sleeping?"], "documents": DOCUMENTS},
    )
    answer = r.json()
    assert answer["modes"] == ["dense"]
    results = answer["data"][0]["results"]
    assert results[0]["index"] == 1
    assert "sparse" not in results[0]
    assert results[0]["score"] == pytest.approx(results[0]["dense"])


@pytest.fixture
async def limited_server(tiny_model_dir: Path, settings_for: Any) -> AsyncIterator[Server]:
    async with running_server(settings_for(tiny_model_dir, max_score_pairs=6)) as server:
        yield server


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"queries": ["a", "b"], "documents": ["x", "y", "z", "w"]}, "too_many_pairs"),
        ({"documents": ["x"]}, "invalid_input"),
        ({"queries": "a", "documents": "x"}, "invalid_input"),
        ({"queries": "a", "documents": []}, "empty_input"),
        ({"queries": "a", "documents": ["x"], "weights": [1, 1]}, "invalid_weights"),
        ({"queries": "a", "documents": ["x"], "weights": [0, 0, 0]}, "invalid_weights"),
        ({"queries": "a", "documents": ["x"], "weights": [1, -1, 1]}, "invalid_weights"),
        ({"queries": "a", "documents": ["x"], "top_n": 0}, "invalid_top_n"),
        ({"queries": [1], "documents": ["x"]}, "invalid_input"),
    ],
)
async def test_score_bad_input(limited_server: Server, body: dict[str, Any], code: str) -> None:
    r = await limited_server.client.post("/v1/score", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code
    if code == "too_many_pairs":
        assert "6" in r.json()["error"]["message"]


async def test_tokenize_matches_the_tokenizer(tiny_server: Server, reference: ReferenceM3) -> None:
    text = "The quick brown fox"
    r = await tiny_server.client.post("/tokenize", json={"inputs": [text, "cat"]})
    assert r.status_code == 200
    first = r.json()[0]
    assert [t["id"] for t in first] == reference.ids(text)
    assert first[0]["special"]
    assert first[-1]["special"]
    for token in first[1:-1]:
        assert not token["special"]
        assert token["text"] == text[token["start"] : token["stop"]]
    plain = await tiny_server.client.post(
        "/tokenize", json={"inputs": text, "add_special_tokens": False}
    )
    assert [t["id"] for t in plain.json()[0]] == [t["id"] for t in first[1:-1]]


async def _check_round_trip(server: Server, tokenizer: Any, special_ids: list[int]) -> None:
    """/decode of /tokenize is the tokenizer's own decode of those ids, and stable."""
    texts = ["The Quick brown fox, jumps!", "Le chat dort sur le rebord."]
    ids, once = await _round_trip(server, texts)
    assert once == [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert (await _round_trip(server, once))[1] == once
    kept = await server.client.post(
        "/decode", json={"ids": special_ids, "skip_special_tokens": False}
    )
    skipped = await server.client.post("/decode", json={"ids": special_ids})
    assert kept.json() == [tokenizer.decode(special_ids, skip_special_tokens=False)]
    assert skipped.json() == [tokenizer.decode(special_ids, skip_special_tokens=True)]
    assert len(kept.json()[0]) > len(skipped.json()[0])


async def test_decode_of_tokenize_is_the_tokenizers_own_tiny(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    await _check_round_trip(tiny_server, reference.tokenizer, [0, 5, 2])


async def test_decode_of_tokenize_is_the_tokenizers_own_minilm(
    bundled_server: Server, bundled_source: ModelSource
) -> None:
    tokenizer = Tokenizer.from_file(str(bundled_source.path / "tokenizer.json"))
    await _check_round_trip(bundled_server, tokenizer, [101, 2000, 102])


# Texts whose ids depend on the checkpoint's own normaliser and pre-tokeniser (the tiny
# model's tokenizer.json normalises with NFKC; transformers 5's XLM-R class would not).
AWKWARD = [
    "first line\nsecond line",
    "\ttabbed\tcolumns",
    "repeated   spaces  here",
    "  leading spaces",
    "\uff46\uff55\uff4c\uff4c\uff0d\uff57\uff49\uff44\uff54\uff48 \uff21\uff22\uff23",  # full-width
    "cafe\u0301 combining accent",
    "\n\n paragraph  \t mixed \r\n",
]


async def test_token_ids_are_the_checkpoint_tokenizer_json_s(
    tiny_server: Server, tiny_model_dir: Path, reference: ReferenceM3
) -> None:
    """/tokenize, the ids the model runs on and usage equal the checkpoint's own
    ``tokenizer.json`` (read by the tokenizers library, not transformers)."""
    checkpoint = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    expected = [checkpoint.encode(text).ids for text in AWKWARD]
    tokens = (await tiny_server.client.post("/tokenize", json={"inputs": AWKWARD})).json()
    assert [[t["id"] for t in row] for row in tokens] == expected
    answer = await tiny_server.client.post("/v1/embeddings", json={"input": AWKWARD})
    assert_dense_answer(answer, reference, AWKWARD)
    assert answer.json()["usage"]["prompt_tokens"] == sum(map(len, expected))


async def test_token_ids_are_the_checkpoint_tokenizer_json_s_minilm(
    bundled_server: Server, bundled_source: ModelSource
) -> None:
    checkpoint = Tokenizer.from_file(str(bundled_source.path / "tokenizer.json"))
    checkpoint.no_truncation()  # the file's own truncation (128) and padding do not apply
    checkpoint.no_padding()
    texts = [*AWKWARD, "word " * 300]
    tokens = (await bundled_server.client.post("/tokenize", json={"inputs": texts})).json()
    assert [[t["id"] for t in row] for row in tokens] == [checkpoint.encode(t).ids for t in texts]


async def _round_trip(server: Server, texts: list[str]) -> tuple[list[list[int]], list[str]]:
    tokens = (await server.client.post("/tokenize", json={"inputs": texts})).json()
    ids = [[t["id"] for t in row] for row in tokens]
    decoded = await server.client.post("/decode", json={"ids": ids})
    assert decoded.status_code == 200
    result: list[str] = decoded.json()
    return ids, result


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/tokenize", {"inputs": []}, "empty_input"),
        ("/tokenize", {"inputs": [1, 2]}, "invalid_input"),
        ("/tokenize", {"inputs": "a", "add_special_tokens": "no"}, "invalid_type"),
        ("/decode", {"ids": ["a"]}, "invalid_input"),
        ("/decode", {"ids": [-1]}, "invalid_token_id"),
        ("/decode", {"ids": [[1, 10**9]]}, "invalid_token_id"),
    ],
)
async def test_tokenize_decode_bad_input(
    tiny_server: Server, path: str, body: dict[str, Any], code: str
) -> None:
    r = await tiny_server.client.post(path, json=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code
