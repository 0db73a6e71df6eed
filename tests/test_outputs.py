"""Every output from one forward pass, and vectors in compact encodings that decode, with the
decoder docs/api.md gives clients, to within the error the docs state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from bge_trio.testing.docs import decoder_from_docs
from tests.conftest import Server, running_server
from tests.reference import ReferenceM3

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores, and the cat agrees.",
]
ALL = ["dense", "sparse", "colbert"]
decode = decoder_from_docs(Path(__file__).resolve().parent.parent / "docs" / "api.md")


async def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await server.client.post(path, json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def test_all_outputs_come_from_one_pass_and_equal_the_separate_routes(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    before = tiny_server.stats().forwarded_items
    every = await _post(tiny_server, "/v1/embeddings", {"input": TEXTS, "outputs": ALL})
    assert tiny_server.stats().forwarded_items - before == len(TEXTS)

    dense = await _post(tiny_server, "/v1/embeddings", {"input": TEXTS})
    sparse = await _post(tiny_server, "/v1/sparse-embeddings", {"input": TEXTS})
    colbert = await _post(tiny_server, "/v1/colbert-embeddings", {"input": TEXTS})
    for i, ref in enumerate(reference.encode(TEXTS)):
        item = every["data"][i]
        assert (item["object"], item["index"]) == ("embedding", i)
        np.testing.assert_allclose(item["embedding"], dense["data"][i]["embedding"], atol=1e-6)
        np.testing.assert_allclose(item["embedding"], ref.dense, atol=1e-5)
        assert item["sparse_values"]["indices"] == sparse["data"][i]["sparse_values"]["indices"]
        np.testing.assert_allclose(
            item["sparse_values"]["values"], sparse["data"][i]["sparse_values"]["values"], atol=1e-6
        )
        np.testing.assert_allclose(
            item["colbert_embeddings"], colbert["data"][i]["embeddings"], atol=1e-6
        )
        np.testing.assert_allclose(item["colbert_embeddings"], ref.colbert, atol=1e-5)
    # the tokens are counted once, not once per output
    assert every["usage"] == dense["usage"] == colbert["usage"]
    assert every["usage"]["prompt_tokens"] == sum(r.tokens for r in reference.encode(TEXTS))


async def test_an_item_holds_exactly_the_outputs_asked_for(tiny_server: Server) -> None:
    only_colbert = await _post(tiny_server, "/v1/embeddings", {"input": "a", "outputs": "colbert"})
    assert set(only_colbert["data"][0]) == {"object", "index", "colbert_embeddings"}
    both = await _post(tiny_server, "/v1/embeddings:both", {"input": "a"})
    assert set(both["data"][0]) == {"object", "index", "embedding", "sparse_values"}
    sparse_colbert = await _post(
        tiny_server, "/v1/embeddings:both", {"input": "a", "outputs": ["sparse", "colbert"]}
    )
    assert set(sparse_colbert["data"][0]) == {
        "object",
        "index",
        "sparse_values",
        "colbert_embeddings",
    }


def _within_documented_error(fmt: str, got: np.ndarray, want: np.ndarray) -> None:
    """The per-value bounds of docs/api.md's table (plus float32 noise between two passes)."""
    noise = 1e-6
    if fmt == "base64":
        np.testing.assert_allclose(got, want, atol=noise, rtol=0)
    elif fmt == "float16":
        bound = np.maximum(np.abs(want) * 2.0**-11, 2.0**-25) + noise
        assert np.all(np.abs(got - want) <= bound)
    elif fmt == "int8":
        scale = np.abs(want).max() / 127
        assert np.all(np.abs(got - want) <= scale / 2 + noise)
        assert np.unique(np.round(got / scale)).size > 2  # not a sign code in disguise
    else:  # binary: the signs, wherever float32 noise cannot flip them
        clear = np.abs(want) > noise
        assert set(np.unique(got)) <= {-1.0, 1.0}
        np.testing.assert_array_equal(np.sign(got[clear]), np.sign(want[clear]))


@pytest.mark.parametrize("fmt", ["base64", "float16", "int8", "binary"])
async def test_compact_encodings_decode_to_within_their_documented_error(
    tiny_server: Server, fmt: str
) -> None:
    exact = await _post(tiny_server, "/v1/embeddings", {"input": TEXTS, "outputs": ALL})
    compact = await _post(
        tiny_server, "/v1/embeddings", {"input": TEXTS, "outputs": ALL, "encoding_format": fmt}
    )
    dimension = tiny_server.info.dimension
    sizes = {"base64": 4 * dimension, "float16": 2 * dimension, "int8": 4 + dimension}
    for want, got in zip(exact["data"], compact["data"], strict=True):
        assert isinstance(got["embedding"], str)
        vectors = [(got["embedding"], want["embedding"])]
        vectors += list(zip(got["colbert_embeddings"], want["colbert_embeddings"], strict=True))
        for encoded, floats in vectors:
            decoded = decode(encoded, fmt, dimension)
            assert decoded.shape == (dimension,)
            _within_documented_error(fmt, decoded, np.asarray(floats, dtype=np.float32))
            raw = len(encoded) * 3 // 4 - encoded.count("=")
            assert raw == sizes.get(fmt, -(-dimension // 8))
        # sparse is never encoded: as floats in every format (two passes, which may run on
        # lanes of different thread counts, agree to float32 noise)
        assert got["sparse_values"]["indices"] == want["sparse_values"]["indices"]
        np.testing.assert_allclose(
            got["sparse_values"]["values"], want["sparse_values"]["values"], atol=1e-6
        )


async def test_dimensions_cut_the_dense_vector_before_it_is_encoded(tiny_server: Server) -> None:
    cut = await _post(
        tiny_server,
        "/v1/embeddings",
        {"input": "a cat", "dimensions": 8, "encoding_format": "int8"},
    )
    floats = await _post(tiny_server, "/v1/embeddings", {"input": "a cat", "dimensions": 8})
    decoded = decode(cut["data"][0]["embedding"], "int8", 8)
    _within_documented_error("int8", decoded, np.asarray(floats["data"][0]["embedding"]))


async def test_the_openai_sdk_passes_outputs_and_reads_them_back(tiny_server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    async with client:
        answer = await client.embeddings.create(
            model="bge-m3",
            input=TEXTS[:2],
            encoding_format="float",
            extra_body={"outputs": ALL},
        )
    floats = await _post(tiny_server, "/v1/embeddings", {"input": TEXTS[:2], "outputs": ALL})
    for item, want in zip(answer.data, floats["data"], strict=True):
        np.testing.assert_allclose(item.embedding, want["embedding"], atol=1e-6)
        extra = item.model_extra or {}
        assert extra["sparse_values"]["indices"] == want["sparse_values"]["indices"]
        np.testing.assert_allclose(
            extra["colbert_embeddings"], want["colbert_embeddings"], atol=1e-6
        )


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        ({"outputs": ["dense", "lexical"]}, "invalid_outputs", ALL),
        ({"outputs": []}, "invalid_outputs", ALL),
        ({"outputs": [1]}, "invalid_outputs", ALL),
        (
            {"encoding_format": "int4"},
            "invalid_encoding_format",
            ["float", "base64", "float16", "int8", "binary"],
        ),
    ],
)
async def test_an_unknown_output_or_encoding_is_a_400_naming_the_allowed_values(
    tiny_server: Server, body: dict[str, Any], code: str, names: list[str]
) -> None:
    r = await tiny_server.client.post("/v1/embeddings", json={"input": "a", **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == code
    assert error["param"] == next(iter(body))
    assert all(name in error["message"] for name in names)


@pytest.fixture
async def bundled_server(settings_for: Any) -> AsyncIterator[Server]:
    async with running_server(settings_for("bundled")) as server:
        yield server


async def test_an_output_the_model_lacks_is_a_400_naming_what_it_offers(
    bundled_server: Server,
) -> None:
    r = await bundled_server.client.post(
        "/v1/embeddings", json={"input": "a", "outputs": ["dense", "colbert"]}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "output_not_supported"
    assert "colbert" in error["message"]
    assert "offers: dense" in error["message"]


FORMATS = ["float", "base64", "float16", "int8", "binary"]
COLBERT_ROUTES = [
    ("/v1/colbert-embeddings", {}, "embeddings"),
    ("/v1/embeddings", {"outputs": ["colbert"]}, "colbert_embeddings"),
    ("/v1/embeddings:both", {"outputs": ["dense", "colbert"]}, "colbert_embeddings"),
]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_text_without_colbert_vectors_is_an_empty_list_in_every_format(
    tiny_server: Server, fmt: str
) -> None:
    """One token id has no ColBERT vector (they start after CLS): an empty list, never a 500,
    on every route that returns them, beside a text that has some."""
    for path, extra, field in COLBERT_ROUTES:
        body = {"input": [[73], [0, 73, 2]], "encoding_format": fmt, **extra}
        answer = await _post(tiny_server, path, body)
        empty, two = (item[field] for item in answer["data"])
        assert empty == [], (path, fmt)
        assert len(two) == 2, (path, fmt)


OUTPUT_SETS = [sorted(chosen) for size in (1, 2, 3) for chosen in combinations(ALL, size)]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_format_with_every_set_of_outputs_answers(
    tiny_server: Server, fmt: str
) -> None:
    """Each encoding with each combination of outputs, for texts and for token ids (one
    token, the special tokens alone): a 200 whose items hold exactly the outputs asked for."""
    fields = {"dense": "embedding", "sparse": "sparse_values", "colbert": "colbert_embeddings"}
    for outputs in OUTPUT_SETS:
        for inputs in (["A cat sleeps.", "."], [[73], [0, 2], [0, 73, 2]]):
            body = {"input": inputs, "encoding_format": fmt, "outputs": outputs}
            answer = await _post(tiny_server, "/v1/embeddings", body)
            assert len(answer["data"]) == len(inputs)
            for item in answer["data"]:
                assert set(item) - {"object", "index"} == {fields[o] for o in outputs}
