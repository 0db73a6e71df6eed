"""The OpenAPI 3.1 description of the API, served at ``GET /openapi.json``.

A test checks that every route the app serves is described here and that every
described route exists, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from bge_trio import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_TEXTS: dict[str, Any] = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        },
    ]
}
_EMBED_FIELDS: dict[str, Any] = {
    "input": _TEXTS,
    "model": {"type": "string"},
    "user": {"type": "string"},
    "long_input": {
        "type": "string",
        "enum": ["truncate", "error", "chunk"],
        "description": "what to do with an input longer than the server allows "
        "(default: the server's BGE_TRIO_LONG_INPUT)",
    },
}
_FORMAT = {"type": "string", "enum": ["float", "base64"], "default": "float"}
_DIMENSIONS = {"type": "integer", "minimum": 1}
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


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": "error",
            "content": {"application/json": {"schema": _ERROR}},
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


def _get(summary: str, codes: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
                **_errors(*codes),
            },
        }
    }


def document() -> dict[str, Any]:
    dense_item: dict[str, Any] = {
        "type": "object",
        "properties": {
            "object": {"const": "embedding"},
            "index": {"type": "integer"},
            "embedding": {
                "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]
            },
        },
    }
    both = _post(
        "Dense and sparse embeddings from one forward pass",
        {
            **_EMBED_FIELDS,
            "encoding_format": _FORMAT,
            "dimensions": _DIMENSIONS,
            "return_tokens": {"type": "boolean"},
        },
        ["input"],
        _list_of(
            {
                **dense_item,
                "properties": {**dense_item["properties"], "sparse_values": _SPARSE_VALUES},
            }
        ),
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bge-trio",
            "version": __version__,
            "description": "BGE-M3 embeddings: dense, sparse, ColBERT, hybrid scores.",
        },
        "paths": {
            "/v1/embeddings": _post(
                "OpenAI-compatible dense embeddings",
                {**_EMBED_FIELDS, "encoding_format": _FORMAT, "dimensions": _DIMENSIONS},
                ["input"],
                _list_of(dense_item),
            ),
            "/v1/sparse-embeddings": _post(
                "Sparse (lexical) weights",
                {**_EMBED_FIELDS, "return_tokens": {"type": "boolean"}},
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
            "/v1/embeddings:both": both,
            "/v1/colbert-embeddings": _post(
                "ColBERT multi-vector embeddings",
                {**_EMBED_FIELDS, "encoding_format": _FORMAT},
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
            "/v1/score": _post(
                "Hybrid relevance scores of documents for queries",
                {
                    "queries": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}},
                        ]
                    },
                    "documents": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "weights": {
                        "type": "array",
                        "items": {"type": "number", "minimum": 0},
                        "minItems": 3,
                        "maxItems": 3,
                    },
                    "top_n": {"type": "integer", "minimum": 1},
                    "return_documents": {"type": "boolean"},
                    "model": {"type": "string"},
                },
                ["queries", "documents"],
                {"type": "object"},
            ),
            "/tokenize": _post(
                "Token ids with their text pieces and offsets",
                {
                    "inputs": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}},
                        ]
                    },
                    "add_special_tokens": {"type": "boolean"},
                },
                ["inputs"],
                {"type": "array"},
            ),
            "/decode": _post(
                "Token ids back to text",
                {"ids": {"oneOf": _TEXTS["oneOf"][2:]}, "skip_special_tokens": {"type": "boolean"}},
                ["ids"],
                {"type": "array", "items": {"type": "string"}},
            ),
            "/v1/models": _get("The served model", (401, 503)),
            "/health": _get("Readiness: 200 when serving, 503 otherwise", (503,)),
            "/live": _get("Liveness"),
            "/info": _get("Server, model and memory-model details", (401,)),
            "/metrics": _get("Prometheus metrics", (401,)),
            "/openapi.json": _get("This document", (401,)),
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
