"""The embedding routes: OpenAI's (dense, or any outputs together), sparse, ColBERT."""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, Response

from bge_trio.api import schemas
from bge_trio.api.encoding import encode_matrix, encode_vector, shorten, sparse_values
from bge_trio.api.errors import json_response
from bge_trio.api.requests import body, envelope, note_usage, service, within_deadline
from bge_trio.model.encoder import DENSE, Embedding, Output
from bge_trio.service import Embedded

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
    embedded = await _embed(payload, SPARSE)
    data = [
        {"object": "sparse_embedding", "index": i, "sparse_values": _sparse(e, return_tokens)}
        for i, e in enumerate(embedded.embeddings)
    ]
    return json_response(envelope(data, embedded.prompt_tokens))


@blueprint.post("/v1/colbert-embeddings")
async def colbert_embeddings() -> Response:
    payload = await body()
    fmt = schemas.parse_encoding_format(payload)
    embedded = await _embed(payload, COLBERT)
    data = [
        {
            "object": "colbert_embedding",
            "index": i,
            "embeddings": encode_matrix(_present(e.colbert), fmt),
        }
        for i, e in enumerate(embedded.embeddings)
    ]
    return json_response(envelope(data, embedded.prompt_tokens))


async def _dense_embeddings(payload: dict[str, Any], default: frozenset[Output]) -> Response:
    """/v1/embeddings and /v1/embeddings:both: the ``outputs`` asked for (``default``
    when none are), all from one forward pass per text."""
    fmt = schemas.parse_encoding_format(payload)
    outputs = schemas.parse_outputs(payload, default)
    return_tokens = schemas.parse_flag(payload, "return_tokens")
    arrived = trio.current_time()  # one startup wait in all, counted from here
    # the model's dimension checks 'dimensions' before any work is queued
    encoder = await service().ready(arrived)
    dims = schemas.parse_dimensions(payload, encoder.info.dimension)
    embedded = await _embed(payload, outputs, arrived)
    data = []
    for i, e in enumerate(embedded.embeddings):
        item: dict[str, Any] = {"object": "embedding", "index": i}
        if "dense" in outputs:
            item["embedding"] = encode_vector(shorten(_present(e.dense), dims), fmt)
        if "sparse" in outputs:
            item["sparse_values"] = _sparse(e, return_tokens)
        if "colbert" in outputs:
            item["colbert_embeddings"] = encode_matrix(_present(e.colbert), fmt)
        data.append(item)
    return json_response(envelope(data, embedded.prompt_tokens))


async def _embed(
    payload: dict[str, Any], outputs: frozenset[Output], arrived: float | None = None
) -> Embedded:
    settings = service().settings
    schemas.check_model(payload)
    inputs = schemas.parse_inputs(
        payload.get("input"), max_items=settings.max_batch, max_chars=settings.max_input_chars
    )
    long_input = schemas.parse_long_input(payload)
    embedded = await within_deadline(
        service().embed, inputs.texts, inputs.token_ids, outputs, long_input, arrived
    )
    note_usage(len(inputs), embedded.prompt_tokens, embedded.timing)
    return embedded


def _sparse(e: Embedding, return_tokens: bool) -> dict[str, Any]:
    indices, values = _present(e.sparse)
    tokens = service().token_strings(indices.tolist()) if return_tokens else None
    return sparse_values(indices, values, tokens)


def _present(value: Any) -> Any:
    """An output the request asked for (the service guarantees it is there)."""
    if value is None:  # pragma: no cover
        raise RuntimeError("missing output")
    return value
