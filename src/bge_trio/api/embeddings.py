"""The embedding routes: OpenAI's (dense, or any outputs together), sparse, ColBERT."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from bge_trio.api import schemas
from bge_trio.api.encoding import encode_matrix, encode_vector, sparse_values
from bge_trio.api.errors import json_response
from bge_trio.api.requests import (
    body,
    engine_for,
    envelope,
    note_usage,
    settings,
    startup_deadline,
    within_deadline,
)
from bge_trio.engine import Embedded, EmbedRequest, Engine
from bge_trio.model.encoder import DENSE, Embedding, Output

SPARSE: frozenset[Output] = frozenset({"sparse"})
BOTH: frozenset[Output] = frozenset({"dense", "sparse"})
COLBERT: frozenset[Output] = frozenset({"colbert"})

blueprint = Blueprint("embeddings", __name__)


@blueprint.post("/v1/embeddings")
async def embeddings() -> Response:
    return await _dense_embeddings(await body(), DENSE)


@blueprint.post("/v1/embeddings:both")
async def embeddings_both() -> Response:
    return await _dense_embeddings(await body(), BOTH)


@blueprint.post("/v1/sparse-embeddings")
async def sparse_embeddings() -> Response:
    payload = await body()
    return_tokens = schemas.parse_flag(payload, "return_tokens")
    engine, embedded = await _embed(payload, SPARSE)
    data = [
        {
            "object": "sparse_embedding",
            "index": i,
            "sparse_values": _sparse(engine, e, return_tokens),
        }
        for i, e in enumerate(embedded.embeddings)
    ]
    return json_response(envelope(data, embedded.prompt_tokens, engine.name))


@blueprint.post("/v1/colbert-embeddings")
async def colbert_embeddings() -> Response:
    payload = await body()
    fmt = schemas.parse_encoding_format(payload)
    engine, embedded = await _embed(payload, COLBERT)
    data = [
        {
            "object": "colbert_embedding",
            "index": i,
            "embeddings": encode_matrix(_present(e.colbert), fmt),
        }
        for i, e in enumerate(embedded.embeddings)
    ]
    return json_response(envelope(data, embedded.prompt_tokens, engine.name))


async def _dense_embeddings(payload: dict[str, Any], default: frozenset[Output]) -> Response:
    """/v1/embeddings and /v1/embeddings:both: the ``outputs`` asked for (``default``
    when none are), all from one forward pass per text."""
    fmt = schemas.parse_encoding_format(payload)
    outputs = schemas.parse_outputs(payload, default)
    return_tokens = schemas.parse_flag(payload, "return_tokens")
    engine, embedded = await _embed(payload, outputs, payload.get("dimensions"))
    data = []
    for i, e in enumerate(embedded.embeddings):
        item: dict[str, Any] = {"object": "embedding", "index": i}
        if "dense" in outputs:
            item["embedding"] = encode_vector(_present(e.dense), fmt)
        if "sparse" in outputs:
            item["sparse_values"] = _sparse(engine, e, return_tokens)
        if "colbert" in outputs:
            item["colbert_embeddings"] = encode_matrix(_present(e.colbert), fmt)
        data.append(item)
    return json_response(envelope(data, embedded.prompt_tokens, engine.name))


async def _embed(
    payload: dict[str, Any], outputs: frozenset[Output], dimensions: object = None
) -> tuple[Engine, Embedded]:
    engine = engine_for(payload, kind="embedding")
    limits = settings()
    inputs = schemas.parse_inputs(
        payload.get("input"), max_items=limits.max_batch, max_chars=limits.max_input_chars
    )
    request = EmbedRequest(
        inputs.texts, inputs.token_ids, outputs, schemas.parse_long_input(payload), dimensions
    )
    embedded = await within_deadline(engine.embed, request, startup_deadline())
    note_usage(len(inputs), embedded.prompt_tokens, embedded.queue_s, embedded.inference_s)
    return engine, embedded


def _sparse(engine: Engine, e: Embedding, return_tokens: bool) -> dict[str, Any]:
    indices, values = _present(e.sparse)
    tokens = engine.token_strings(indices.tolist()) if return_tokens else None
    return sparse_values(indices, values, tokens)


def _present(value: Any) -> Any:
    """An output the request asked for (the engine guarantees it is there)."""
    if value is None:  # pragma: no cover
        raise RuntimeError("missing output")
    return value
