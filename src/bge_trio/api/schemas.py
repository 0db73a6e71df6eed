"""Parsing and validating request bodies.

Bodies are checked here, before any work is queued, and every problem becomes a
400 that names the offending field. Unknown fields are accepted and ignored, as
OpenAI does.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import orjson

from bge_trio.config import LONG_INPUTS, LongInput
from bge_trio.engine.inputs import is_int
from bge_trio.errors import UnsupportedMediaType, invalid
from bge_trio.model.encoder import Output
from bge_trio.scoring import MODES, Weights

EncodingFormat = Literal["float", "base64", "float16", "int8", "binary"]
EQUAL_WEIGHTS = Weights()
ENCODING_FORMATS: tuple[EncodingFormat, ...] = ("float", "base64", "float16", "int8", "binary")


@attrs.frozen
class Inputs:
    """A request's inputs: texts, or token id lists (exactly one is set)."""

    texts: list[str] | None
    token_ids: list[list[int]] | None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def parse_json_body(content_type: str | None, data: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 415/400 explaining what is wrong."""
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {mimetype or 'missing'!r}",
            code="unsupported_media_type",
        )
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return body


def parse_inputs(
    value: object, *, max_items: int, max_chars: int | None = None, param: str = "input"
) -> Inputs:
    """OpenAI's ``input``: a string, strings, a token id list, or token id lists."""
    inputs = _parse_inputs(value, max_items=max_items, param=param)
    if max_chars is not None and inputs.texts is not None:
        _check_chars(inputs.texts, max_chars, param)
    return inputs


def _check_count(value: list[Any], name: str, max_items: int) -> None:
    if not value:
        raise invalid(f"'{name}' must not be empty", param=name, code="empty_input")
    if len(value) > max_items:
        raise invalid(
            f"'{name}' has {len(value)} items; at most {max_items} are allowed per request",
            param=name,
            code="too_many_inputs",
        )


def _check_chars(texts: list[str], max_chars: int, param: str) -> None:
    for index, text in enumerate(texts):
        if len(text) > max_chars:
            raise invalid(
                f"'{param}[{index}]' has {len(text)} characters; at most {max_chars} are "
                "allowed (BGE_TRIO_MAX_INPUT_CHARS)",
                param=param,
                code="input_too_long",
            )


def _parse_inputs(value: object, *, max_items: int, param: str) -> Inputs:
    if value is None:
        raise invalid(f"'{param}' is required", param=param, code="missing_input")
    if isinstance(value, str):
        return Inputs([value], None)
    if not isinstance(value, list):
        raise invalid(
            f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
            "token id lists",
            param=param,
            code="invalid_input",
        )
    _check_count(value, param, max_items)
    if all(isinstance(v, str) for v in value):
        return Inputs(list(value), None)
    if all(is_int(v) for v in value):
        return Inputs(None, [[int(v) for v in value]])
    if all(isinstance(v, list) for v in value):
        for index, ids in enumerate(value):
            if not ids:
                raise invalid(
                    f"'{param}[{index}]' is an empty token id list",
                    param=param,
                    code="empty_input",
                )
            if not all(is_int(t) for t in ids):
                raise invalid(
                    f"'{param}[{index}]' must be a list of integer token ids",
                    param=param,
                    code="invalid_input",
                )
        return Inputs(None, [[int(t) for t in ids] for ids in value])
    raise invalid(
        f"'{param}' mixes types; use only strings, only token ids, or only token id lists",
        param=param,
        code="invalid_input",
    )


def parse_encoding_format(body: dict[str, Any]) -> EncodingFormat:
    value = body.get("encoding_format", "float")
    if value is None:
        return "float"
    if value not in ENCODING_FORMATS:
        raise invalid(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, not {value!r}",
            param="encoding_format",
            code="invalid_encoding_format",
        )
    return value  # type: ignore[no-any-return]


def parse_outputs(body: dict[str, Any], default: frozenset[Output]) -> frozenset[Output]:
    """``outputs``: which of the model's outputs to return, all from one forward pass."""
    value = body.get("outputs")
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v in MODES for v in value)
    ):
        raise invalid(
            f"'outputs' must be a non-empty list of {', '.join(MODES)}, not {value!r}",
            param="outputs",
            code="invalid_outputs",
        )
    return frozenset(value)


def parse_flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false", param=name, code="invalid_type")
    return value


def parse_long_input(body: dict[str, Any]) -> LongInput | None:
    """The request's ``long_input`` policy, or None for the server's default."""
    value = body.get("long_input")
    if value is None:
        return None
    if value not in LONG_INPUTS:
        raise invalid(
            f"'long_input' must be one of {', '.join(LONG_INPUTS)}, not {value!r}",
            param="long_input",
            code="invalid_long_input",
        )
    return value  # type: ignore[no-any-return]


def check_model(body: dict[str, Any]) -> None:
    """``model`` and ``user`` are optional and any value is accepted, but they must be strings."""
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise invalid("'model' must be a string", param="model", code="invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("'user' must be a string", param="user", code="invalid_type")


@attrs.frozen
class ScoreRequest:
    queries: list[str]
    documents: list[str]
    weights: Weights
    top_n: int | None
    return_documents: bool


def _strings(value: object, name: str, max_items: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(
            f"'{name}' must be a string or a list of strings", param=name, code="invalid_input"
        )
    _check_count(value, name, max_items)
    return list(value)


def parse_score_request(
    body: dict[str, Any],
    *,
    max_items: int,
    max_pairs: int,
    max_chars: int | None = None,
    weights: Weights = EQUAL_WEIGHTS,
) -> ScoreRequest:
    """/v1/score: queries x documents; ``weights`` is the server's default."""
    queries = _strings(body.get("queries"), "queries", max_items)
    if isinstance(body.get("documents"), str):
        raise invalid(
            "'documents' must be a list of strings", param="documents", code="invalid_input"
        )
    documents = _strings(body.get("documents"), "documents", max_items)
    return _scoring(body, queries, documents, max_pairs, max_chars, weights)


def parse_rerank_request(
    body: dict[str, Any],
    *,
    max_items: int,
    max_pairs: int,
    max_chars: int | None = None,
    weights: Weights = EQUAL_WEIGHTS,
) -> ScoreRequest:
    """/v1/rerank (Cohere's, Jina's, TEI's and vLLM's shape): one query, its documents.

    Documents are strings or ``{"text": ...}`` objects, as those APIs accept.
    """
    query = body.get("query")
    if not isinstance(query, str):
        raise invalid("'query' must be a string", param="query", code="invalid_input")
    raw = body.get("documents")
    if isinstance(raw, list):
        raw = [d.get("text") if isinstance(d, dict) else d for d in raw]
    if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
        raise invalid(
            "'documents' must be a list of strings or of objects with a 'text' string",
            param="documents",
            code="invalid_input",
        )
    documents = _strings(raw, "documents", max_items)
    return _scoring(body, [query], documents, max_pairs, max_chars, weights)


def parse_tei_rerank_request(
    body: dict[str, Any],
    *,
    max_items: int,
    max_pairs: int,
    max_chars: int | None = None,
    weights: Weights = EQUAL_WEIGHTS,
) -> ScoreRequest:
    """TEI's /rerank: ``query``, ``texts`` and ``return_text`` (``raw_scores`` is how the
    answer is shaped: the route reads it)."""
    query = body.get("query")
    if not isinstance(query, str):
        raise invalid("'query' must be a string", param="query", code="invalid_input")
    raw = body.get("texts")
    if not isinstance(raw, list):
        raise invalid("'texts' must be a list of strings", param="texts", code="invalid_input")
    texts = _strings(raw, "texts", max_items)
    scoring = _scoring(body, [query], texts, max_pairs, max_chars, weights)
    return attrs.evolve(scoring, return_documents=parse_flag(body, "return_text"))


def _scoring(
    body: dict[str, Any],
    queries: list[str],
    documents: list[str],
    max_pairs: int,
    max_chars: int | None,
    weights: Weights,
) -> ScoreRequest:
    if max_chars is not None:
        _check_chars(queries, max_chars, "queries" if len(queries) > 1 else "query")
        _check_chars(documents, max_chars, "documents")
    pairs = len(queries) * len(documents)
    if pairs > max_pairs:
        raise invalid(
            f"{len(queries)} queries x {len(documents)} documents = {pairs} pairs, more than "
            f"the limit of {max_pairs} (BGE_TRIO_MAX_SCORE_PAIRS)",
            param="documents",
            code="too_many_pairs",
        )
    top_n = body.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 1):
        raise invalid("'top_n' must be a positive integer", param="top_n", code="invalid_top_n")
    return ScoreRequest(
        queries,
        documents,
        parse_weights(body, weights),
        None if top_n is None else int(top_n),
        parse_flag(body, "return_documents"),
    )


def parse_weights(body: dict[str, Any], default: Weights) -> Weights:
    """``weights``: [dense, sparse, colbert], non-negative, not all zero."""
    raw = body.get("weights")
    if raw is None:
        return default
    if (
        not isinstance(raw, list)
        or len(raw) != 3
        or not all(_is_number(w) and 0 <= w < math.inf for w in raw)
        or sum(raw) <= 0
    ):
        raise invalid(
            "'weights' must be three non-negative numbers for [dense, sparse, colbert], not "
            "all zero",
            param="weights",
            code="invalid_weights",
        )
    return Weights(*(float(w) for w in raw))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_ids(value: object, *, max_items: int) -> list[list[int]]:
    """``ids`` of /decode: one token id list, or a list of them."""
    inputs = parse_inputs(value, max_items=max_items, param="ids")
    if inputs.token_ids is None:
        raise invalid(
            "'ids' must be a list of token ids or a list of such lists",
            param="ids",
            code="invalid_input",
        )
    return inputs.token_ids
