"""The routes for operators and clients' discovery: the model list, readiness, liveness,
details, metrics and the OpenAPI document."""

from __future__ import annotations

import time

from quart import Blueprint, Response

from bge_trio import metrics
from bge_trio.api import openapi
from bge_trio.api.errors import json_response
from bge_trio.api.requests import service
from bge_trio.memory.probe import resident_bytes

blueprint = Blueprint("operations", __name__)
CREATED = int(time.time())


@blueprint.get("/v1/models")
async def models() -> Response:
    info = (await service().ready()).info
    model = {
        "id": info.name,
        "object": "model",
        "created": CREATED,
        "owned_by": "bge-trio",
        "dimension": info.dimension,
        "max_seq_length": info.max_seq_length,
        "outputs": sorted(info.outputs),
    }
    return json_response({"object": "list", "data": [model]})


@blueprint.get("/health")
async def health() -> Response:
    return json_response(service().health(), 200 if service().healthy else 503)


@blueprint.get("/live")
async def live() -> Response:
    return json_response({"status": "alive"})


@blueprint.get("/info")
async def info() -> Response:
    return json_response(service().describe())


@blueprint.get("/metrics")
async def prometheus() -> Response:
    metrics.RESIDENT.set(resident_bytes())
    text, content_type = metrics.render()
    return Response(text, content_type=content_type)


@blueprint.get("/openapi.json")
async def openapi_document() -> Response:
    settings = service().settings
    loaded = service().info if service().encoder is not None else None
    limits = openapi.Limits(
        max_items=settings.max_batch,
        max_chars=settings.max_input_chars,
        max_pairs=settings.max_score_pairs,
        vocab_size=None if loaded is None else loaded.vocab_size,
        dimension=None if loaded is None else loaded.dimension,
        outputs=None if loaded is None else frozenset(loaded.outputs),
    )
    return json_response(openapi.document(limits))
