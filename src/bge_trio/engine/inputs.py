"""The rules a request's inputs meet before they reach the scheduler, and the
results put back together after: pure functions of the model, the settings and the
memory budget, used by the engine and the bulk job alike.

An input longer than the model or the budget allows is truncated, refused, or
chunked into overlapping windows whose results are merged (``long_input``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

import attrs
import numpy as np

from bge_trio.config import LongInput
from bge_trio.errors import ContextLengthExceeded, InputTooLarge, invalid
from bge_trio.model.encoder import Embedding, Encoder, ModelInfo
from bge_trio.model.windows import Windows, merge, split


@attrs.frozen(eq=False)
class Embedded:
    """Results of one request, in input order, with the tokens that went in and where its
    time went (waiting for passes, in passes)."""

    embeddings: list[Embedding]
    token_ids: list[list[int]]
    queue_s: float = 0.0
    inference_s: float = 0.0
    embedded_tokens: int | None = None  # every token embedded, when inputs were split

    @property
    def prompt_tokens(self) -> int:
        if self.embedded_tokens is not None:
            return self.embedded_tokens
        return sum(len(ids) for ids in self.token_ids)


def check_outputs(info: ModelInfo, outputs: frozenset[str]) -> None:
    """Every output asked for has a head in this model."""
    missing = outputs - info.outputs
    if missing:
        raise invalid(
            f"model {info.name!r} has no {' or '.join(sorted(missing))} head; it "
            f"offers: {', '.join(sorted(info.outputs))}",
            param="model",
            code="output_not_supported",
        )


def check_dimensions(info: ModelInfo, value: object) -> int | None:
    """``dimensions``: None, or an integer from 1 to the model's dimension."""
    if value is None:
        return None
    if not is_int(value) or not 1 <= value <= info.dimension:
        raise invalid(
            f"'dimensions' must be an integer from 1 to {info.dimension}, not {value!r}",
            param="dimensions",
            code="invalid_dimensions",
        )
    return int(value)


def is_int(value: object) -> TypeGuard[int | float]:
    """An integer as JSON Schema counts them: 3 and 3.0 alike (not true or false)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def shortened(embedding: Embedding, dimensions: int | None) -> Embedding:
    """The dense vector cut to its first ``dimensions`` values and re-normalised to unit
    length (Matryoshka-style); the other outputs as they are."""
    dense = embedding.dense
    if dimensions is None or dense is None or dimensions >= dense.shape[-1]:
        return embedding
    cut = dense[:dimensions]
    norm = float(np.linalg.norm(cut))
    return attrs.evolve(embedding, dense=cut / norm if norm > 0 else cut)


def check_token_ids(
    vocab_size: int, token_ids: Sequence[Sequence[int]], param: str = "input"
) -> list[list[int]]:
    """Token ids given as input, each inside the model's vocabulary."""
    for index, ids in enumerate(token_ids):
        for token in ids:
            if not 0 <= token < vocab_size:
                raise invalid(
                    f"{param}[{index}] has token id {token}, outside this model's vocabulary "
                    f"[0, {vocab_size})",
                    param=param,
                    code="invalid_token_id",
                )
    return [list(ids) for ids in token_ids]


@attrs.frozen
class Lengths:
    """How long an input may be: the model's maximum, what fits the memory budget in one
    pass, and the chunking window (``BGE_TRIO_CHUNK_WINDOW``, ``BGE_TRIO_CHUNK_OVERLAP``)."""

    max_seq: int
    fits_memory: int
    chunk_window: int | None
    chunk_overlap: int


def fit_lengths(
    encoder: Encoder, token_ids: list[list[int]], long_input: LongInput, lengths: Lengths
) -> list[Windows]:
    """Each input as the windows it runs in: one, unless it is chunked."""
    max_seq = lengths.max_seq
    fits = min(max_seq, lengths.fits_memory)
    window = min(lengths.chunk_window or fits, fits)
    overlap = min(lengths.chunk_overlap, max(0, (window - 2) // 2))
    fitted = []
    for index, ids in enumerate(token_ids):
        if long_input == "chunk" and len(ids) > window:
            fitted.append(split(ids, window, overlap, encoder.closing_ids))
            continue
        if len(ids) > max_seq and long_input == "error":
            raise ContextLengthExceeded(
                f"input[{index}] has {len(ids)} tokens, more than the maximum of "
                f"{max_seq}; shorten it, or send 'long_input': 'truncate' or 'chunk'",
                index=index,
                tokens=len(ids),
                limit=max_seq,
                reason="model",
                code="context_length_exceeded",
            )
        if len(ids) > fits and long_input == "error":
            raise InputTooLarge(
                f"input[{index}] has {len(ids)} tokens; the largest text that fits this "
                f"server's memory budget has {fits} tokens; shorten it, or send "
                "'long_input': 'truncate' or 'chunk'",
                index=index,
                tokens=len(ids),
                limit=fits,
                reason="memory",
                code="input_too_large_for_memory",
            )
        fitted.append(Windows((tuple(encoder.truncate(ids, fits)),), 0))
    return fitted


def merged(
    ids: list[list[int]],
    windows: list[Windows],
    results: list[Embedding],
    queue_s: float = 0.0,
    inference_s: float = 0.0,
) -> Embedded:
    """One result per input from its windows' results; usage counts every window's tokens."""
    out = []
    start = 0
    for w in windows:
        out.append(merge(results[start : start + len(w.token_ids)], w))
        start += len(w.token_ids)
    chunked = any(len(w.token_ids) > 1 for w in windows)
    return Embedded(
        out,
        [
            list(full) if len(w.token_ids) > 1 else list(w.token_ids[0])
            for full, w in zip(ids, windows, strict=True)
        ],
        queue_s,
        inference_s,
        embedded_tokens=sum(w.tokens for w in windows) if chunked else None,
    )
