"""The OpenAPI 3.1 description of the API, served at ``GET /openapi.json``.

A test checks that every route the app serves is described here and that every
described route exists, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

import attrs

from bge_trio import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_NULL = {"type": "null"}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying (here, or on another replica)",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


@attrs.frozen
class Limits:
    """What this server accepts, so the document says exactly what it validates.

    The model's numbers (vocabulary, dimension, outputs) are known once it is loaded;
    before that the document leaves them open.
    """

    max_items: int
    max_chars: int
    max_pairs: int
    vocab_size: int | None = None
    dimension: int | None = None
    outputs: frozenset[str] | None = None


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field that may also be sent as null (the same as leaving it out)."""
    return {"anyOf": [schema, _NULL]}


def _inputs(limits: Limits) -> dict[str, Any]:
    text = {"type": "string", "maxLength": limits.max_chars}
    token: dict[str, Any] = {"type": "integer", "minimum": 0}
    if limits.vocab_size is not None:
        token["maximum"] = limits.vocab_size - 1
    many = {"minItems": 1, "maxItems": limits.max_items}
    return {
        "anyOf": [
            text,
            {"type": "array", "items": text, **many},
            {"type": "array", "items": token, **many},
            {"type": "array", "items": {"type": "array", "items": token, "minItems": 1}, **many},
        ]
    }


def _embed_fields(limits: Limits) -> dict[str, Any]:
    return {
        "input": _inputs(limits),
        "model": _optional({"type": "string"}),
        "user": _optional({"type": "string"}),
        "long_input": _optional(
            {
                "type": "string",
                "enum": ["truncate", "error", "chunk"],
                "description": "what to do with an input longer than the server allows "
                "(default: the server's BGE_TRIO_LONG_INPUT)",
            }
        ),
    }


_FORMAT = _optional(
    {
        "type": "string",
        "enum": ["float", "base64", "float16", "int8", "binary"],
        "default": "float",
        "description": "float: JSON numbers; the others: base64 of little-endian float32 "
        "(base64), float16, int8 after a float32 scale, or packed sign bits (binary)",
    }
)
_SPARSE_VALUES = {
    "type": "object",
    "required": ["indices", "values"],
    "properties": {
        "indices": {"type": "array", "items": {"type": "integer"}},
        "values": {"type": "array", "items": {"type": "number"}},
        "tokens": {"type": "array", "items": {"type": "string"}},
    },
}
_USAGE = {
    "type": "object",
    "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
}


def _outputs(limits: Limits) -> dict[str, Any]:
    name = {"type": "string", "enum": sorted(limits.outputs or ("dense", "sparse", "colbert"))}
    return _optional(
        {
            "anyOf": [name, {"type": "array", "items": name, "minItems": 1}],
            "description": "the outputs to return, all from one forward pass",
        }
    )


_RERANKED = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "rerank"},
        "model": {"type": "string"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "relevance_score"],
                "properties": {
                    "index": {"type": "integer"},
                    "relevance_score": {"type": "number"},
                    "raw_score": {
                        "type": "number",
                        "description": "a cross-encoder's logit (relevance_score is its sigmoid)",
                    },
                    "document": {"type": "object", "properties": {"text": {"type": "string"}}},
                },
            },
        },
        "usage": _USAGE,
    },
}


def _dimensions(limits: Limits) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": 1}
    if limits.dimension is not None:
        schema["maximum"] = limits.dimension
    return _optional(schema)


def _weights(limits: Limits) -> dict[str, Any]:
    """Three non-negative weights; at least one output the model has must weigh > 0."""
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "number", "minimum": 0},
        "minItems": 3,
        "maxItems": 3,
        "description": "[dense, sparse, colbert]",
    }
    modes = ("dense", "sparse", "colbert")
    outputs = limits.outputs or frozenset(modes)
    if all(mode in outputs for mode in modes):
        schema["not"] = {"items": {"const": 0}}  # not all zero
    else:
        schema["anyOf"] = [
            {"prefixItems": [{} for _ in range(i)] + [{"exclusiveMinimum": 0}]}
            for i, mode in enumerate(modes)
            if mode in outputs
        ]
    return schema


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": "error",
            "content": {"application/json": {"schema": _ERROR}},
            **({"headers": _RETRY_AFTER} if code in (429, 503) else {}),
        }
        for code in codes
    }


def _post(summary: str, fields: dict[str, Any], required: list[str], item: Any) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "required": required, "properties": fields}
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": item}},
                },
                **_errors(400, 401, 413, 415, 429, 500, 503, 504),
            },
        }
    }


def _list_of(data_item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": data_item},
            "model": {"type": "string"},
            "usage": _USAGE,
        },
    }


def _get(
    summary: str, codes: tuple[int, ...] = (), content_type: str = "application/json"
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {content_type: {"schema": {}}}},
                **_errors(*codes),
            },
        }
    }


def _health() -> dict[str, Any]:
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }
    return {
        "get": {
            "summary": "Readiness: 200 when serving; 503 while loading, probing, draining, "
            "or after a failure",
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": status}}},
                "503": {
                    "description": "not ready",
                    "content": {"application/json": {"schema": status}},
                },
            },
        }
    }


def document(limits: Limits) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bge-trio",
            "version": __version__,
            "description": "BGE-M3 embeddings: dense, sparse, ColBERT, hybrid scores.",
        },
        "paths": {
            **_embedding_paths(limits),
            **_retrieval_paths(limits),
            **_operation_paths(),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        }
                    },
                }
            }
        },
    }


def _embedding_paths(limits: Limits) -> dict[str, Any]:
    vector = {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}
    embedding_item: dict[str, Any] = {
        "type": "object",
        "properties": {
            "object": {"const": "embedding"},
            "index": {"type": "integer"},
            "embedding": vector,
            "sparse_values": _SPARSE_VALUES,
            "colbert_embeddings": {"type": "array", "items": vector},
        },
    }
    embedding_fields = {
        **_embed_fields(limits),
        "encoding_format": _FORMAT,
        "dimensions": _dimensions(limits),
        "outputs": _outputs(limits),
        "return_tokens": {"type": "boolean"},
    }
    return {
        "/v1/embeddings": _post(
            "OpenAI-compatible embeddings: dense by default, or any of the model's "
            "outputs together",
            embedding_fields,
            ["input"],
            _list_of(embedding_item),
        ),
        "/v1/sparse-embeddings": _post(
            "Sparse (lexical) weights",
            {**_embed_fields(limits), "return_tokens": {"type": "boolean"}},
            ["input"],
            _list_of(
                {
                    "type": "object",
                    "properties": {
                        "object": {"const": "sparse_embedding"},
                        "index": {"type": "integer"},
                        "sparse_values": _SPARSE_VALUES,
                    },
                }
            ),
        ),
        "/v1/embeddings:both": _post(
            "/v1/embeddings with dense and sparse outputs by default",
            embedding_fields,
            ["input"],
            _list_of(embedding_item),
        ),
        "/v1/colbert-embeddings": _post(
            "ColBERT multi-vector embeddings",
            {**_embed_fields(limits), "encoding_format": _FORMAT},
            ["input"],
            _list_of(
                {
                    "type": "object",
                    "properties": {
                        "object": {"const": "colbert_embedding"},
                        "index": {"type": "integer"},
                        "embeddings": {"type": "array"},
                    },
                }
            ),
        ),
    }


def _retrieval_paths(limits: Limits) -> dict[str, Any]:
    text = {"type": "string", "maxLength": limits.max_chars}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_items}
    return {
        "/v1/score": _post(
            "Hybrid relevance scores of documents for queries "
            f"(queries x documents at most {limits.max_pairs} pairs)",
            {
                "queries": {"anyOf": [text, texts]},
                "documents": texts,
                "weights": _optional(_weights(limits)),
                "top_n": _optional({"type": "integer", "minimum": 1}),
                "return_documents": {"type": "boolean"},
                "model": _optional({"type": "string"}),
                "user": _optional({"type": "string"}),
            },
            ["queries", "documents"],
            {"type": "object"},
        ),
        "/v1/rerank": _rerank(limits, text),
        "/v2/rerank": _rerank(limits, text),
        "/rerank": _post(
            "TEI's rerank: documents ranked for a query, best first; score = sigmoid of a "
            "cross-encoder's logit (the logit with raw_scores), or an embedding model's "
            f"hybrid score (at most {limits.max_pairs} texts)",
            {
                "query": text,
                "texts": {**texts, "maxItems": min(limits.max_items, limits.max_pairs)},
                "raw_scores": {"type": "boolean"},
                "return_text": {"type": "boolean"},
                "model": _optional({"type": "string"}),
            },
            ["query", "texts"],
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "score"],
                    "properties": {
                        "index": {"type": "integer"},
                        "score": {"type": "number"},
                        "text": {"type": "string"},
                    },
                },
            },
        ),
        "/tokenize": _post(
            "Token ids with their text pieces and offsets",
            {"inputs": {"anyOf": [text, texts]}, "add_special_tokens": {"type": "boolean"}},
            ["inputs"],
            {"type": "array"},
        ),
        "/decode": _post(
            "Token ids back to text",
            {
                "ids": {"anyOf": _inputs(limits)["anyOf"][2:]},
                "skip_special_tokens": {"type": "boolean"},
            },
            ["ids"],
            {"type": "array", "items": {"type": "string"}},
        ),
    }


def _rerank(limits: Limits, text: dict[str, Any]) -> dict[str, Any]:
    return _post(
        "Documents ranked for a query, in the shape of the Cohere (v1 and v2), Jina and "
        "vLLM rerank APIs: by a cross-encoder (relevance_score = sigmoid(logit), raw_score "
        "= the logit) when the model is one or the request names none and one is served, "
        f"else by the hybrid score (at most {limits.max_pairs} documents)",
        {
            "query": text,
            "documents": {
                "type": "array",
                "items": {
                    "anyOf": [
                        text,
                        {
                            "type": "object",
                            "required": ["text"],
                            "properties": {"text": text},
                        },
                    ]
                },
                "minItems": 1,
                "maxItems": min(limits.max_items, limits.max_pairs),
            },
            "weights": _optional(_weights(limits)),
            "top_n": _optional({"type": "integer", "minimum": 1}),
            "return_documents": {"type": "boolean"},
            "model": _optional({"type": "string"}),
            "user": _optional({"type": "string"}),
        },
        ["query", "documents"],
        _RERANKED,
    )


def _operation_paths() -> dict[str, Any]:
    return {
        "/v1/models": _get("The served models, each with its kind", (401, 503)),
        "/health": _health(),
        "/live": _get("Liveness"),
        "/info": _get("Server, model and memory-model details", (401,)),
        "/metrics": _get("Prometheus metrics", (401,), content_type="text/plain"),
        "/openapi.json": _get("This document", (401,)),
    }
