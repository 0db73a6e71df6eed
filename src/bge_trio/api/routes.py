"""The routes. Each parses its body, asks the service, and shapes the answer.

Routes never block the event loop: tokenisation and forward passes run in worker
threads inside the service; building the response is a few numpy operations.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import numpy as np
import trio
from quart import Blueprint, Response, g, request

from bge_trio import __version__, metrics
from bge_trio.api import openapi, schemas
from bge_trio.api.encoding import encode_matrix, encode_vector, shorten, sparse_values
from bge_trio.api.errors import json_response
from bge_trio.errors import TimedOut, invalid
from bge_trio.memory.probe import resident_bytes
from bge_trio.model.encoder import Embedding, Output
from bge_trio.scheduler.scheduler import Timing
from bge_trio.service import Embedded, EmbeddingService

DENSE: frozenset[Output] = frozenset({"dense"})
SPARSE: frozenset[Output] = frozenset({"sparse"})
BOTH: frozenset[Output] = frozenset({"dense", "sparse"})
COLBERT: frozenset[Output] = frozenset({"colbert"})
T = TypeVar("T")
SCORE_NAMES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


def create_blueprint(service: EmbeddingService) -> Blueprint:
    api = Blueprint("api", __name__)
    created = int(time.time())

    async def body() -> dict[str, Any]:
        raw = await request.get_data()
        g.body_read = True  # the connection can serve the next request (see hooks)
        data = raw.encode() if isinstance(raw, str) else raw
        return schemas.parse_json_body(request.headers.get("Content-Type"), data)

    async def embed(
        payload: dict[str, Any], outputs: frozenset[Output], arrived: float | None = None
    ) -> Embedded:
        schemas.check_model(payload)
        inputs = schemas.parse_inputs(
            payload.get("input"),
            max_items=service.settings.max_batch,
            max_chars=service.settings.max_input_chars,
        )
        long_input = schemas.parse_long_input(payload)
        embedded = await within_deadline(
            service.embed, inputs.texts, inputs.token_ids, outputs, long_input, arrived
        )
        note_usage(len(inputs), embedded.prompt_tokens, embedded.timing)
        return embedded

    async def within_deadline(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn`` under the request deadline; past it, queued texts are dropped (504)."""
        limit = service.settings.request_timeout_s
        with trio.move_on_after(limit):
            return await fn(*args)
        raise TimedOut(
            f"the request did not finish within {limit:g} s; retry, or send fewer texts",
            code="request_timeout",
        )

    def envelope(data: list[dict[str, Any]], embedded: Embedded) -> dict[str, Any]:
        tokens = embedded.prompt_tokens
        return {
            "object": "list",
            "data": data,
            "model": service.info.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def dense_embeddings(payload: dict[str, Any], outputs: frozenset[Output]) -> Response:
        """/v1/embeddings, and /v1/embeddings:both when ``outputs`` includes sparse."""
        fmt = schemas.parse_encoding_format(payload)
        return_tokens = schemas.parse_flag(payload, "return_tokens")
        arrived = trio.current_time()  # one startup wait in all, counted from here
        encoder = await service.ready(arrived)
        dims = schemas.parse_dimensions(payload, encoder.info.dimension)
        embedded = await embed(payload, outputs, arrived)
        data = []
        for i, e in enumerate(embedded.embeddings):
            item: dict[str, Any] = {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(shorten(_dense(e.dense), dims), fmt),
            }
            if "sparse" in outputs:
                item["sparse_values"] = _sparse(e, return_tokens)
            data.append(item)
        return json_response(envelope(data, embedded))

    @api.post("/v1/embeddings")
    async def embeddings() -> Response:
        return await dense_embeddings(await body(), DENSE)

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
        return await dense_embeddings(await body(), BOTH)

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

    @api.post("/v1/score")
    async def score() -> Response:
        payload = await body()
        schemas.check_model(payload)
        settings = service.settings
        req = schemas.parse_score_request(
            payload,
            max_items=settings.max_batch,
            max_pairs=settings.max_score_pairs,
            max_chars=settings.max_input_chars,
        )
        scored = await within_deadline(service.score, req.queries, req.documents, req.weights)
        note_usage(len(req.queries) + len(req.documents), scored.prompt_tokens)
        names = [name for name in SCORE_NAMES if name in scored.scores]
        data = []
        for qi, query in enumerate(req.queries):
            order = np.argsort(-scored.scores["hybrid"][qi], kind="stable")
            if req.top_n is not None:
                order = order[: req.top_n]
            results = []
            for di in order.tolist():
                result: dict[str, Any] = {"index": di}
                if req.return_documents:
                    result["document"] = req.documents[di]
                result["score"] = float(scored.scores["hybrid"][qi, di])
                result.update({name: float(scored.scores[name][qi, di]) for name in names})
                results.append(result)
            data.append({"object": "score_list", "index": qi, "query": query, "results": results})
        tokens = scored.prompt_tokens
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": service.info.name,
                "modes": list(scored.modes),
                "weights": attrs.asdict(req.weights),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @api.post("/tokenize")
    async def tokenize() -> Response:
        payload = await body()
        inputs = schemas.parse_inputs(
            payload.get("inputs"),
            max_items=service.settings.max_batch,
            max_chars=service.settings.max_input_chars,
            param="inputs",
        )
        if inputs.texts is None:
            raise invalid(
                "'inputs' must be a string or a list of strings",
                param="inputs",
                code="invalid_input",
            )
        add_special = schemas.parse_flag(payload, "add_special_tokens", default=True)
        tokens = await service.tokens(inputs.texts, add_special)
        return json_response([[attrs.asdict(t) for t in row] for row in tokens])

    @api.post("/decode")
    async def decode() -> Response:
        payload = await body()
        ids = schemas.parse_ids(payload.get("ids"), max_items=service.settings.max_batch)
        skip = schemas.parse_flag(payload, "skip_special_tokens", default=True)
        return json_response(await service.decode(ids, skip))

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
        status = 200 if service.healthy else 503
        return json_response(service.health(), status)

    @api.get("/metrics")
    async def prometheus() -> Response:
        metrics.RESIDENT.set(resident_bytes())
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @api.get("/openapi.json")
    async def openapi_document() -> Response:
        settings = service.settings
        info = service.info if service.encoder is not None else None
        limits = openapi.Limits(
            max_items=settings.max_batch,
            max_chars=settings.max_input_chars,
            max_pairs=settings.max_score_pairs,
            vocab_size=None if info is None else info.vocab_size,
            dimension=None if info is None else info.dimension,
            outputs=None if info is None else frozenset(info.outputs),
        )
        return json_response(openapi.document(limits))

    @api.get("/live")
    async def live() -> Response:
        return json_response({"status": "alive"})

    @api.get("/info")
    async def info() -> Response:
        body: dict[str, Any] = {
            "version": __version__,
            "status": service.status,
            "workers": service.lanes.workers,
            "threads_per_pass": service.lanes.threads,
            "express_lane": {
                "max_tokens": service.lanes.express_tokens,
                "threads": service.lanes.express_threads,
                "regular_threads_beside_it": service.lanes.shared_threads,
            },
            "processes": service.settings.processes,
            "max_batch": service.settings.max_batch,
            "long_input": service.settings.long_input,
            "truncate": service.settings.long_input == "truncate",
        }
        if service.cpu is not None:
            body["cpu"] = {
                "threads": service.cpu.threads,
                "cpus": service.cpu.cpus,
                "affinity": service.cpu.affinity,
                "source": service.cpu.source,
            }
        if service.encoder is not None:
            info = service.info
            body.update(
                {
                    "model_id": info.name,
                    "dimension": info.dimension,
                    "max_seq_length": info.max_seq_length,
                    "dtype": info.dtype,
                    "dtype_reason": info.dtype_reason,
                    "pooling": info.pooling,
                    "outputs": sorted(info.outputs),
                }
            )
        if service.memory is not None:
            body["memory"] = service.memory.report()
            body["memory"]["drift"] = service.recalibrator.statistics().report()
        body["speed"] = service.speed()
        return json_response(body)

    return api


def note_usage(inputs: int, tokens: int, timing: Timing | None = None) -> None:
    """Record what the request carried and where its time went, for its log line."""
    g.inputs = inputs
    g.tokens = tokens
    if timing is not None:
        g.queue_ms = round(timing.queue_s * 1000, 2)
        g.inference_ms = round(timing.inference_s * 1000, 2)


def _dense(value: Any) -> Any:
    if value is None:  # pragma: no cover - the service guarantees requested outputs
        raise RuntimeError("missing output")
    return value
