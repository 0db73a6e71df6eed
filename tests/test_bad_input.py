"""Every kind of bad request gets a 4xx JSON error in the OpenAI shape, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bge_trio.memory.cost import CostModel
from bge_trio.scheduler.batching import BatchPolicy
from tests.conftest import Server, running_server
from tests.reference import ReferenceM3, assert_dense_answer

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def strict_server(tiny_model_dir: Path, settings_for: Any) -> AsyncIterator[Server]:
    settings = settings_for(tiny_model_dir, max_batch=4, max_seq_length=16, long_input="error")
    async with running_server(settings) as server:
        yield server


CASES: list[tuple[str, str, str, Any, dict[str, str], int, str | None]] = [
    # (id, method, path, body (bytes or JSON), headers, status, error code)
    ("malformed json", "POST", "/v1/embeddings", b'{"input": ["a"', JSON, 400, "invalid_json"),
    ("body not an object", "POST", "/v1/embeddings", b'["a"]', JSON, 400, "invalid_json"),
    (
        "wrong content type",
        "POST",
        "/v1/embeddings",
        b'{"input": "a"}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    (
        "missing content type",
        "POST",
        "/v1/embeddings",
        b'{"input": "a"}',
        {},
        415,
        "unsupported_media_type",
    ),
    ("missing input", "POST", "/v1/embeddings", {"model": "x"}, JSON, 400, "missing_input"),
    ("empty input list", "POST", "/v1/embeddings", {"input": []}, JSON, 400, "empty_input"),
    ("input a number", "POST", "/v1/embeddings", {"input": 5}, JSON, 400, "invalid_input"),
    ("input an object", "POST", "/v1/embeddings", {"input": {"a": 1}}, JSON, 400, "invalid_input"),
    ("mixed types", "POST", "/v1/embeddings", {"input": ["a", 1]}, JSON, 400, "invalid_input"),
    ("nested strings", "POST", "/v1/embeddings", {"input": [["a"]]}, JSON, 400, "invalid_input"),
    ("too deep", "POST", "/v1/embeddings", {"input": [[[1]]]}, JSON, 400, "invalid_input"),
    ("empty token list", "POST", "/v1/embeddings", {"input": [[]]}, JSON, 400, "empty_input"),
    (
        "booleans as ids",
        "POST",
        "/v1/embeddings",
        {"input": [True, False]},
        JSON,
        400,
        "invalid_input",
    ),
    (
        "too many inputs",
        "POST",
        "/v1/embeddings",
        {"input": ["a"] * 5},
        JSON,
        400,
        "too_many_inputs",
    ),
    (
        "too many documents to score",
        "POST",
        "/v1/score",
        {"queries": ["q"], "documents": ["a"] * 5},
        JSON,
        400,
        "too_many_inputs",
    ),
    (
        "too many queries to score",
        "POST",
        "/v1/score",
        {"queries": ["q"] * 5, "documents": ["a"]},
        JSON,
        400,
        "too_many_inputs",
    ),
    (
        "too many documents to rerank",
        "POST",
        "/v1/rerank",
        {"query": "q", "documents": ["a"] * 5},
        JSON,
        400,
        "too_many_inputs",
    ),
    (
        "too many texts to rerank, TEI's shape",
        "POST",
        "/rerank",
        {"query": "q", "texts": ["a"] * 5},
        JSON,
        400,
        "too_many_inputs",
    ),
    (
        "negative token id",
        "POST",
        "/v1/embeddings",
        {"input": [0, -1, 2]},
        JSON,
        400,
        "invalid_token_id",
    ),
    (
        "token id past vocab",
        "POST",
        "/v1/embeddings",
        {"input": [0, 10**9, 2]},
        JSON,
        400,
        "invalid_token_id",
    ),
    (
        "unknown encoding",
        "POST",
        "/v1/embeddings",
        {"input": "a", "encoding_format": "hex"},
        JSON,
        400,
        "invalid_encoding_format",
    ),
    (
        "dimensions zero",
        "POST",
        "/v1/embeddings",
        {"input": "a", "dimensions": 0},
        JSON,
        400,
        "invalid_dimensions",
    ),
    (
        "dimensions too big",
        "POST",
        "/v1/embeddings",
        {"input": "a", "dimensions": 33},
        JSON,
        400,
        "invalid_dimensions",
    ),
    (
        "dimensions a string",
        "POST",
        "/v1/embeddings",
        {"input": "a", "dimensions": "8"},
        JSON,
        400,
        "invalid_dimensions",
    ),
    (
        "model not a string",
        "POST",
        "/v1/embeddings",
        {"input": "a", "model": 3},
        JSON,
        400,
        "invalid_type",
    ),
    (
        "return_tokens not bool",
        "POST",
        "/v1/sparse-embeddings",
        {"input": "a", "return_tokens": "yes"},
        JSON,
        400,
        "invalid_type",
    ),
    (
        "too long, no truncation",
        "POST",
        "/v1/embeddings",
        {"input": ["short", "the quick brown fox jumps over the lazy dog " * 4]},
        JSON,
        400,
        "context_length_exceeded",
    ),
    ("unknown route", "GET", "/v2/nothing", None, {}, 404, "not_found"),
    ("wrong method", "GET", "/v1/embeddings", None, {}, 405, "method_not_allowed"),
    ("wrong method on health", "POST", "/health", None, {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
async def test_bad_input_is_a_clear_4xx(
    strict_server: Server,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    content = (
        body
        if isinstance(body, bytes) or body is None
        else httpx.Request("POST", "/", json=body).content
    )
    r = await strict_server.client.request(method, path, content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    # the server keeps serving
    ok = await strict_server.client.post("/v1/embeddings", json={"input": "still fine"})
    assert ok.status_code == 200


async def test_too_long_error_names_index_and_tokens(
    strict_server: Server, reference: ReferenceM3
) -> None:
    text = "the quick brown fox jumps over the lazy dog " * 4
    r = await strict_server.client.post("/v1/embeddings", json={"input": ["ok", text]})
    tokens = len(reference.ids(text))
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert error["message"].startswith(f"input[1] has {tokens} tokens, more than the maximum of 16")


async def test_unknown_fields_are_ignored(strict_server: Server, reference: ReferenceM3) -> None:
    r = await strict_server.client.post(
        "/v1/embeddings", json={"input": "a", "user": "u1", "something_new": {"x": 1}}
    )
    assert_dense_answer(r, reference, ["a"])


def _cut(reference: ReferenceM3, text: str, tokens: int) -> np.ndarray:
    """The reference's dense vector of ``text`` cut as FlagEmbedding cuts it: the first
    ``tokens`` - 1 ids, then the end-of-sequence id."""
    ids = reference.ids(text)
    (expected,) = reference.encode_ids([ids[: tokens - 1] + ids[-1:]])
    return expected.dense


async def test_truncation_keeps_the_first_tokens_and_the_end_of_sequence(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    settings = settings_for(tiny_model_dir, max_seq_length=16)
    async with running_server(settings) as server:
        text = "the quick brown fox jumps over the lazy dog " * 4
        r = await server.client.post("/v1/embeddings", json={"input": [text, text]})
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == 32
        for item in r.json()["data"]:
            np.testing.assert_allclose(item["embedding"], _cut(reference, text, 16), atol=1e-5)
        r = await server.client.post("/v1/colbert-embeddings", json={"input": text})
        assert len(r.json()["data"][0]["embeddings"]) == 15  # every token after CLS, EOS kept


@pytest.mark.parametrize("truncate", [False, True])
async def test_text_too_large_for_the_memory_budget(
    tiny_model_dir: Path, settings_for: Any, truncate: bool, reference: ReferenceM3
) -> None:
    long_input = "truncate" if truncate else "error"
    async with running_server(settings_for(tiny_model_dir, long_input=long_input)) as server:
        # the budget shrinks below what a 10-token text needs (a = 1 byte per token)
        server.scheduler.set_policy(BatchPolicy(CostModel(1.0, 0.0), 10.0))
        text = "the quick brown fox jumps over the lazy dog"
        tokens = len(reference.ids(text))
        assert tokens > 10
        r = await server.client.post("/v1/embeddings", json={"input": ["ok", text]})
        if truncate:
            assert r.status_code == 200
            short = len(reference.ids("ok"))
            assert r.json()["usage"]["prompt_tokens"] == short + 10
            cut = r.json()["data"][1]["embedding"]
            np.testing.assert_allclose(cut, _cut(reference, text, 10), atol=1e-5)
        else:
            assert r.status_code == 413
            error = r.json()["error"]
            assert error["code"] == "input_too_large_for_memory"
            assert "input[1]" in error["message"]
            assert f"has {tokens} tokens" in error["message"]
            assert "has 10 tokens" in error["message"]
