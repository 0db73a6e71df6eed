"""The retrieval routes: hybrid scores, and the tokenizer both ways."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
from quart import Blueprint, Response

from bge_trio.api import schemas
from bge_trio.api.errors import json_response
from bge_trio.api.requests import body, envelope, note_usage, service, within_deadline
from bge_trio.errors import invalid

SCORE_NAMES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")

blueprint = Blueprint("retrieval", __name__)


@blueprint.post("/v1/score")
async def score() -> Response:
    payload = await body()
    schemas.check_model(payload)
    settings = service().settings
    req = schemas.parse_score_request(
        payload,
        max_items=settings.max_batch,
        max_pairs=settings.max_score_pairs,
        max_chars=settings.max_input_chars,
    )
    scored = await within_deadline(service().score, req.queries, req.documents, req.weights)
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
    return json_response(
        envelope(
            data,
            scored.prompt_tokens,
            modes=list(scored.modes),
            weights=attrs.asdict(req.weights),
        )
    )


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    payload = await body()
    settings = service().settings
    inputs = schemas.parse_inputs(
        payload.get("inputs"),
        max_items=settings.max_batch,
        max_chars=settings.max_input_chars,
        param="inputs",
    )
    if inputs.texts is None:
        raise invalid(
            "'inputs' must be a string or a list of strings", param="inputs", code="invalid_input"
        )
    add_special = schemas.parse_flag(payload, "add_special_tokens", default=True)
    tokens = await service().tokens(inputs.texts, add_special)
    return json_response([[attrs.asdict(t) for t in row] for row in tokens])


@blueprint.post("/decode")
async def decode() -> Response:
    payload = await body()
    ids = schemas.parse_ids(payload.get("ids"), max_items=service().settings.max_batch)
    skip = schemas.parse_flag(payload, "skip_special_tokens", default=True)
    return json_response(await service().decode(ids, skip))
