"""The routes for operators and clients' discovery: the model list, readiness, liveness,
details, metrics and the OpenAPI document."""

from __future__ import annotations

import time

from quart import Blueprint, Response

from bge_trio import metrics
from bge_trio.api import openapi, reports
from bge_trio.api.errors import json_response
from bge_trio.api.requests import engines, settings, startup_deadline
from bge_trio.memory.probe import resident_bytes

blueprint = Blueprint("operations", __name__)
CREATED = int(time.time())


@blueprint.get("/v1/models")
async def models() -> Response:
    data = []
    deadline = startup_deadline()
    for engine in engines():
        info = await engine.loaded(deadline)
        shape = {"dimension": info.dimension} if info.kind == "embedding" else {"labels": 1}
        data.append(
            {
                "id": info.name,
                "object": "model",
                "created": CREATED,
                "owned_by": "bge-trio",
                "kind": info.kind,
                **shape,
                "max_seq_length": info.max_seq_length,
                "outputs": sorted(info.outputs),
            }
        )
    return json_response({"object": "list", "data": data})


@blueprint.get("/health")
async def health() -> Response:
    """200 when every model is ready; with several, each model's own report too."""
    stats = [engine.statistics() for engine in engines()]
    body = reports.health(stats[0])
    sick = [one for one in stats if not one.healthy]
    if len(stats) > 1:
        models = {one.name: reports.health(one) for one in stats}
        body = {**(models[sick[0].name] if sick else body), "models": models}
    return json_response(body, 503 if sick else 200)


@blueprint.get("/live")
async def live() -> Response:
    return json_response({"status": "alive"})


@blueprint.get("/info")
async def info() -> Response:
    stats = [engine.statistics() for engine in engines()]
    body = reports.describe(stats[0], settings())
    if len(stats) > 1:
        body["models"] = [reports.describe(one, settings()) for one in stats]
    return json_response(body)


@blueprint.get("/metrics")
async def prometheus() -> Response:
    metrics.RESIDENT.set(resident_bytes())
    text, content_type = metrics.render()
    return Response(text, content_type=content_type)


@blueprint.get("/openapi.json")
async def openapi_document() -> Response:
    limits = settings()
    loaded = engines().default.info
    document = openapi.Limits(
        max_items=limits.max_batch,
        max_chars=limits.max_input_chars,
        max_pairs=limits.max_score_pairs,
        vocab_size=None if loaded is None else loaded.vocab_size,
        dimension=None if loaded is None else loaded.dimension,
        outputs=None if loaded is None else frozenset(loaded.outputs),
    )
    return json_response(openapi.document(document))
