"""Vectors on the wire: JSON floats or base64 of little-endian float32.

The openai SDK asks for base64 by default and decodes it with numpy; a float32
vector of 1024 dimensions is 5.4 kB as base64 and about 11 kB as JSON text.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt

from bge_trio.api.schemas import EncodingFormat


def shorten(vector: npt.NDArray[np.float32], dimensions: int | None) -> npt.NDArray[np.float32]:
    """Keep the first ``dimensions`` values and re-normalise to unit length."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    cut = vector[:dimensions]
    norm = float(np.linalg.norm(cut))
    return cut / norm if norm > 0 else cut


def encode_vector(vector: npt.NDArray[np.float32], fmt: EncodingFormat) -> Any:
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
    return vector  # orjson writes numpy float32 arrays directly


def encode_matrix(matrix: npt.NDArray[np.float32], fmt: EncodingFormat) -> Any:
    if fmt == "base64":
        return [encode_vector(row, fmt) for row in matrix]
    return matrix


def sparse_values(
    indices: npt.NDArray[np.int64], values: npt.NDArray[np.float32], tokens: list[str] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"indices": indices, "values": values}
    if tokens is not None:
        out["tokens"] = tokens
    return out
