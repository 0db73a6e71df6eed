"""Embeddings as Arrow rows: the output schema and its metadata.

Columns: the id (as the input had it), ``tokens`` (tokens embedded), ``dense``
(list<float32>), ``sparse_ids`` (list<int32>, ascending) and ``sparse_weights``
(list<float32>) when the model has the sparse head, ``colbert`` (list<list<float32>>,
one vector per token) when asked for, and ``error``: null, or why the row has no
vectors (an empty text, no id, ...). Every input row is one output row. The
schema's metadata key ``bge_trio`` holds the model and settings as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from bge_trio import __version__
from bge_trio.model.encoder import Embedding, Output

METADATA_KEY = b"bge_trio"


def arrow_id_type(id_type: str) -> Any:
    """The id column's Arrow type for a job's id type (``int`` or ``str``)."""
    return pa.int64() if id_type == "int" else pa.string()


def schema(id_type: pa.DataType, outputs: frozenset[Output], metadata: dict[str, Any]) -> Any:
    fields = [pa.field("id", id_type), pa.field("tokens", pa.int32())]
    if "dense" in outputs:
        fields.append(pa.field("dense", pa.list_(pa.float32())))
    if "sparse" in outputs:
        fields.append(pa.field("sparse_ids", pa.list_(pa.int32())))
        fields.append(pa.field("sparse_weights", pa.list_(pa.float32())))
    if "colbert" in outputs:
        fields.append(pa.field("colbert", pa.list_(pa.list_(pa.float32()))))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def table(
    ids: Sequence[Any],
    embeddings: Sequence[Embedding | None],
    tokens: Sequence[int],
    errors: Sequence[str | None],
    target: Any,
) -> Any:
    """The rows as a table of the ``target`` schema; a row with an error has no vectors."""
    columns: dict[str, Any] = {"id": list(ids), "tokens": list(tokens), "error": list(errors)}
    names = set(target.names)
    if "dense" in names:
        columns["dense"] = [None if e is None else e.dense for e in embeddings]
    if "sparse_ids" in names:
        sparse = [None if e is None else e.sparse for e in embeddings]
        columns["sparse_ids"] = [None if s is None else s[0].astype("int32") for s in sparse]
        columns["sparse_weights"] = [None if s is None else s[1] for s in sparse]
    if "colbert" in names:
        columns["colbert"] = [
            None if e is None or e.colbert is None else list(e.colbert) for e in embeddings
        ]
    arrays = [pa.array(columns[field.name], type=field.type) for field in target]
    return pa.Table.from_arrays(arrays, schema=target)


def available_outputs(model_path: Any) -> frozenset[Output]:
    """The outputs a model directory offers, from its head files (without loading it)."""
    from bge_trio.model import heads

    found: set[Output] = {"dense"}
    if (model_path / heads.SPARSE_FILE).is_file():
        found.add("sparse")
    if (model_path / heads.COLBERT_FILE).is_file():
        found.add("colbert")
    return frozenset(found)


def describe(
    model: str, info: dict[str, Any], outputs: frozenset[Output], settings: dict[str, Any]
) -> dict[str, Any]:
    """What the file's metadata says about how its vectors were made."""
    return {
        "producer": f"bge-trio {__version__}",
        "model": model,
        **info,
        "outputs": sorted(outputs),
        "settings": settings,
    }
