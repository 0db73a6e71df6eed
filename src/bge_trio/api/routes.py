"""The routes. Each parses its body, asks the service, and shapes the answer.

Routes never block the event loop: tokenisation and forward passes run in worker
threads inside the service; building the response is a few numpy operations.
"""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, request

from bge_trio import __version__
from bge_trio.api import schemas
from bge_trio.api.encoding import encode_matrix, encode_vector, shorten, sparse_values
from bge_trio.api.errors import json_response
from bge_trio.model.encoder import Embedding, Output
from bge_trio.service import Embedded, EmbeddingService

DENSE: frozenset[Output] = frozenset({"dense"})
SPARSE: frozenset[Output] = frozenset({"sparse"})
BOTH: frozenset[Output] = frozenset({"dense", "sparse"})
COLBERT: frozenset[Output] = frozenset({"colbert"})


def create_blueprint(service: EmbeddingService) -> Blueprint:
    api = Blueprint("api", __name__)
    created = int(time.time())

    async def body() -> dict[str, Any]:
        raw = await request.get_data()
        data = raw.encode() if isinstance(raw, str) else raw
        return schemas.parse_json_body(request.headers.get("Content-Type"), data)

    async def embed(payload: dict[str, Any], outputs: frozenset[Output]) -> Embedded:
        schemas.check_model(payload)
        inputs = schemas.parse_inputs(payload.get("input"), max_items=service.settings.max_batch)
        return await service.embed(inputs.texts, inputs.token_ids, outputs)

    def envelope(data: list[dict[str, Any]], embedded: Embedded) -> dict[str, Any]:
        tokens = embedded.prompt_tokens
        return {
            "object": "list",
            "data": data,
            "model": service.info.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @api.post("/v1/embeddings")
    async def embeddings() -> Response:
        payload = await body()
        fmt = schemas.parse_encoding_format(payload)
        encoder = await service.ready()
        dims = schemas.parse_dimensions(payload, encoder.info.dimension)
        embedded = await embed(payload, DENSE)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(shorten(_dense(e.dense), dims), fmt),
            }
            for i, e in enumerate(embedded.embeddings)
        ]
        return json_response(envelope(data, embedded))

    @api.post("/v1/sparse-embeddings")
    async def sparse_embeddings() -> Response:
        payload = await body()
        return_tokens = schemas.parse_flag(payload, "return_tokens")
        embedded = await embed(payload, SPARSE)
        data = [
            {"object": "sparse_embedding", "index": i, "sparse_values": _sparse(e, return_tokens)}
            for i, e in enumerate(embedded.embeddings)
        ]
        return json_response(envelope(data, embedded))

    @api.post("/v1/embeddings:both")
    async def embeddings_both() -> Response:
        payload = await body()
        fmt = schemas.parse_encoding_format(payload)
        return_tokens = schemas.parse_flag(payload, "return_tokens")
        encoder = await service.ready()
        dims = schemas.parse_dimensions(payload, encoder.info.dimension)
        embedded = await embed(payload, BOTH)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(shorten(_dense(e.dense), dims), fmt),
                "sparse_values": _sparse(e, return_tokens),
            }
            for i, e in enumerate(embedded.embeddings)
        ]
        return json_response(envelope(data, embedded))

    @api.post("/v1/colbert-embeddings")
    async def colbert_embeddings() -> Response:
        payload = await body()
        fmt = schemas.parse_encoding_format(payload)
        embedded = await embed(payload, COLBERT)
        data = [
            {
                "object": "colbert_embedding",
                "index": i,
                "embeddings": encode_matrix(_dense(e.colbert), fmt),
            }
            for i, e in enumerate(embedded.embeddings)
        ]
        return json_response(envelope(data, embedded))

    def _sparse(e: Embedding, return_tokens: bool) -> dict[str, Any]:
        indices, values = _dense(e.sparse)
        tokens = service.token_strings(indices.tolist()) if return_tokens else None
        return sparse_values(indices, values, tokens)

    @api.get("/v1/models")
    async def models() -> Response:
        encoder = await service.ready()
        info = encoder.info
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": info.name,
                        "object": "model",
                        "created": created,
                        "owned_by": "bge-trio",
                        "dimension": info.dimension,
                        "max_seq_length": info.max_seq_length,
                        "outputs": sorted(info.outputs),
                    }
                ],
            }
        )

    @api.get("/health")
    async def health() -> Response:
        status = 200 if service.status == "ok" else 503
        return json_response(service.health(), status)

    @api.get("/live")
    async def live() -> Response:
        return json_response({"status": "alive"})

    @api.get("/info")
    async def info() -> Response:
        body: dict[str, Any] = {
            "version": __version__,
            "status": service.status,
            "workers": service.settings.workers,
            "processes": service.settings.processes,
            "max_batch": service.settings.max_batch,
            "truncate": service.settings.truncate,
        }
        if service.encoder is not None:
            info = service.info
            body.update(
                {
                    "model_id": info.name,
                    "dimension": info.dimension,
                    "max_seq_length": info.max_seq_length,
                    "dtype": info.dtype,
                    "pooling": info.pooling,
                    "outputs": sorted(info.outputs),
                }
            )
        if service.memory is not None:
            body["memory"] = service.memory.report()
        return json_response(body)

    return api


def _dense(value: Any) -> Any:
    if value is None:  # pragma: no cover - the service guarantees requested outputs
        raise RuntimeError("missing output")
    return value
