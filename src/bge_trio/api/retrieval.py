"""The retrieval routes: hybrid scores in our shape and in the rerank APIs' shape, and the
tokenizer both ways."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
from quart import Blueprint, Response

from bge_trio.api import schemas
from bge_trio.api.errors import json_response
from bge_trio.api.requests import (
    body,
    engine_for,
    engines,
    envelope,
    note_usage,
    settings,
    startup_deadline,
    within_deadline,
)
from bge_trio.engine import Engine, Scored
from bge_trio.errors import invalid
from bge_trio.scoring import Weights

SCORE_NAMES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")

blueprint = Blueprint("retrieval", __name__)


@blueprint.post("/v1/score")
async def score() -> Response:
    engine, req = await _request(schemas.parse_score_request)
    scored = await _scored(engine, req)
    names = [name for name in SCORE_NAMES if name in scored.scores]
    data = []
    for qi, query in enumerate(req.queries):
        results = []
        for di in _ranked(scored.scores["hybrid"][qi], req.top_n):
            result: dict[str, Any] = {"index": di}
            if req.return_documents:
                result["document"] = req.documents[di]
            result["score"] = float(scored.scores["hybrid"][qi, di])
            result.update({name: float(scored.scores[name][qi, di]) for name in names})
            results.append(result)
        data.append({"object": "score_list", "index": qi, "query": query, "results": results})
    return json_response(
        envelope(
            data,
            scored.prompt_tokens,
            engine.name,
            modes=list(scored.modes),
            weights=attrs.asdict(req.weights),
        )
    )


@blueprint.post("/v1/rerank")
@blueprint.post("/v2/rerank")
async def rerank() -> Response:
    """The rerank APIs' shape (Cohere v1 and v2, Jina, vLLM, infinity). With a cross-encoder,
    ``relevance_score`` is sigmoid(logit) (FlagReranker's ``normalize=True``) and
    ``raw_score`` the logit; with an embedding model, the hybrid score of /v1/score."""
    payload = await body()
    engine, req = _rerank_request(payload, schemas.parse_rerank_request)
    relevance, tokens = await _relevance(engine, req)
    results = []
    for di in _ranked(relevance.scores, req.top_n):
        result: dict[str, Any] = {"index": di, "relevance_score": float(relevance.scores[di])}
        if relevance.raw is not None:
            result["raw_score"] = float(relevance.raw[di])
        if req.return_documents:
            result["document"] = {"text": req.documents[di]}
        results.append(result)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "rerank",
            "model": engine.name,
            "results": results,
            "usage": usage,
        }
    )


@blueprint.post("/rerank")
async def tei_rerank() -> Response:
    """TEI's shape: ``query`` and ``texts`` in; ``[{index, score, text?}]``, best first,
    out. ``score`` is sigmoid(logit), or the logit with ``raw_scores``; with an embedding
    model, the hybrid score either way."""
    payload = await body()
    engine, req = _rerank_request(payload, schemas.parse_tei_rerank_request)
    raw_scores = schemas.parse_flag(payload, "raw_scores")
    relevance, _ = await _relevance(engine, req)
    scores = relevance.raw if raw_scores and relevance.raw is not None else relevance.scores
    results = []
    for di in _ranked(scores, None):
        result: dict[str, Any] = {"index": di, "score": float(scores[di])}
        if req.return_documents:
            result["text"] = req.documents[di]
        results.append(result)
    return json_response(results)


@attrs.frozen(eq=False)
class Relevance:
    """Each document's relevance to the query, and the cross-encoder's logits (None for
    an embedding model's hybrid score)."""

    scores: npt.NDArray[np.float32]
    raw: npt.NDArray[np.float32] | None


def _rerank_request(
    payload: dict[str, Any], parse: Callable[..., schemas.ScoreRequest]
) -> tuple[Engine, schemas.ScoreRequest]:
    """The engine that reranks (the request's ``model``; when it names none, the first
    cross-encoder served, else the embedding model's hybrid score), and the request."""
    schemas.check_model(payload)
    model = payload.get("model")
    crossing = engines().of_kind("reranker")
    if model is None and crossing:
        engine = crossing[0]
    else:
        engine = engines().find(model if isinstance(model, str) else None)
    return engine, _parsed(payload, parse)


async def _relevance(engine: Engine, req: schemas.ScoreRequest) -> tuple[Relevance, int]:
    """The documents' relevance to the one query, and the tokens read."""
    if engine.kind != "reranker":
        scored = await _scored(engine, req)
        return Relevance(scored.scores["hybrid"][0], None), scored.prompt_tokens
    deadline = startup_deadline()
    query = req.queries[0]
    reranked = await within_deadline(engine.rerank, query, req.documents, deadline)
    note_usage(len(req.documents), reranked.prompt_tokens, reranked.queue_s, reranked.inference_s)
    relevance = 1.0 / (1.0 + np.exp(-reranked.logits.astype(np.float64)))
    return Relevance(relevance.astype(np.float32), reranked.logits), reranked.prompt_tokens


async def _request(
    parse: Callable[..., schemas.ScoreRequest],
) -> tuple[Engine, schemas.ScoreRequest]:
    """The embedding engine the body names, and the body parsed under this server's
    limits, with its default weights."""
    payload = await body()
    return engine_for(payload, kind="embedding"), _parsed(payload, parse)


def _parsed(
    payload: dict[str, Any], parse: Callable[..., schemas.ScoreRequest]
) -> schemas.ScoreRequest:
    limits = settings()
    return parse(
        payload,
        max_items=limits.max_batch,
        max_pairs=limits.max_score_pairs,
        max_chars=limits.max_input_chars,
        weights=Weights(*limits.score_weights),
    )


async def _scored(engine: Engine, req: schemas.ScoreRequest) -> Scored:
    deadline = startup_deadline()
    scored = await within_deadline(engine.score, req.queries, req.documents, req.weights, deadline)
    note_usage(len(req.queries) + len(req.documents), scored.prompt_tokens, None, None)
    return scored


def _ranked(scores: npt.NDArray[np.float32], top_n: int | None) -> list[int]:
    """Document indices, best first (ties in input order), the first ``top_n`` of them."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:top_n]]


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    payload = await body()
    limits = settings()
    inputs = schemas.parse_inputs(
        payload.get("inputs"),
        max_items=limits.max_batch,
        max_chars=limits.max_input_chars,
        param="inputs",
    )
    if inputs.texts is None:
        raise invalid(
            "'inputs' must be a string or a list of strings", param="inputs", code="invalid_input"
        )
    add_special = schemas.parse_flag(payload, "add_special_tokens", default=True)
    tokens = await engine_for(payload, check=False).tokens(
        inputs.texts, add_special, startup_deadline()
    )
    return json_response([[attrs.asdict(t) for t in row] for row in tokens])


@blueprint.post("/decode")
async def decode() -> Response:
    payload = await body()
    ids = schemas.parse_ids(payload.get("ids"), max_items=settings().max_batch)
    skip = schemas.parse_flag(payload, "skip_special_tokens", default=True)
    engine = engine_for(payload, check=False)
    return json_response(await engine.decode(ids, skip, startup_deadline()))
