"""Vectors on the wire: JSON floats, or base64 of one of four binary layouts.

The openai SDK asks for ``base64`` (little-endian float32) by default and decodes
it with numpy: a 1024-dimension vector is 5.4 kB as base64 and about 11 kB as
JSON text. The compact layouts trade precision for size, which matters most for
ColBERT (one vector per token): an 8,000-token document is ~44 MB as float32
base64, 22 MB as float16, 11 MB as int8 and 1.4 MB as binary.

* ``float16``: little-endian IEEE half precision, ``2·d`` bytes; each value within
  ``max(|x|·2⁻¹¹, 2⁻²⁵)`` of float32's.
* ``int8``: a little-endian float32 ``scale`` then ``d`` signed bytes ``q`` with
  ``x ≈ scale·q`` and ``scale = max|x| / 127`` (one scale per vector); each value
  within ``scale / 2``.
* ``binary``: the sign bits (``x > 0`` is 1), packed eight to a byte, first value
  in the most significant bit (numpy's ``packbits``), ``ceil(d / 8)`` bytes.

docs/api.md has the decoding helper; tests decode with it.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt

from bge_trio.api.schemas import EncodingFormat


def encode_vector(vector: npt.NDArray[np.float32], fmt: EncodingFormat) -> Any:
    if fmt == "float":
        return vector  # orjson writes numpy float32 arrays directly
    return encode_matrix(vector[np.newaxis, :], fmt)[0]


def encode_matrix(matrix: npt.NDArray[np.float32], fmt: EncodingFormat) -> Any:
    """A multi-vector (one row per token): a list of vectors, each encoded alone."""
    if fmt == "float":
        return matrix
    return [base64.b64encode(row).decode() for row in _layout(matrix, fmt)]


def _layout(matrix: npt.NDArray[np.float32], fmt: EncodingFormat) -> npt.NDArray[np.uint8]:
    """Every row's bytes in ``fmt``'s layout, computed for all rows at once."""
    rows, width = matrix.shape
    if fmt in ("base64", "float16"):
        dtype = np.dtype("<f4" if fmt == "base64" else "<f2")
        # the width is explicit: a text with no ColBERT vector is a (0, d) matrix
        row_bytes = width * dtype.itemsize
        return np.ascontiguousarray(matrix, dtype=dtype).view(np.uint8).reshape(rows, row_bytes)
    if fmt == "int8":
        peaks = np.abs(matrix).max(axis=1) if matrix.size else np.zeros(rows, np.float32)
        scales = np.where(peaks > 0, peaks / 127, 1).astype("<f4")
        quantised = np.clip(np.rint(matrix / scales[:, np.newaxis]), -127, 127).astype(np.int8)
        out = np.empty((rows, 4 + width), dtype=np.uint8)
        out[:, :4] = scales.view(np.uint8).reshape(rows, 4)
        out[:, 4:] = quantised.view(np.uint8)
        return out
    packed: npt.NDArray[np.uint8] = np.packbits(matrix > 0, axis=1)  # binary
    return packed


def sparse_values(
    indices: npt.NDArray[np.int64], values: npt.NDArray[np.float32], tokens: list[str] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"indices": indices, "values": values}
    if tokens is not None:
        out["tokens"] = tokens
    return out
