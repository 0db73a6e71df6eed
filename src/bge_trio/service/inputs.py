"""The rules a request's inputs meet before they reach the scheduler, and the
results put back together after: pure functions of the model, the settings and the
memory budget.

An input longer than the model or the budget allows is truncated, refused, or
chunked into overlapping windows whose results are merged (``long_input``).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from bge_trio.config import LongInput
from bge_trio.errors import TooLarge, invalid
from bge_trio.model.encoder import Embedding, Encoder
from bge_trio.model.windows import Windows, merge, split
from bge_trio.scheduler.scheduler import Timing


@attrs.frozen(eq=False)
class Embedded:
    """Results of one request, in input order, with the tokens that went in."""

    embeddings: list[Embedding]
    token_ids: list[list[int]]
    timing: Timing = attrs.field(factory=Timing)
    embedded_tokens: int | None = None  # every token embedded, when inputs were split

    @property
    def prompt_tokens(self) -> int:
        if self.embedded_tokens is not None:
            return self.embedded_tokens
        return sum(len(ids) for ids in self.token_ids)


def check_outputs(encoder: Encoder, outputs: frozenset[str]) -> None:
    """Every output asked for has a head in this model."""
    info = encoder.info
    missing = outputs - info.outputs
    if missing:
        raise invalid(
            f"model {info.name!r} has no {' or '.join(sorted(missing))} head; it "
            f"offers: {', '.join(sorted(info.outputs))}",
            param="model",
            code="output_not_supported",
        )


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
            raise invalid(
                f"input[{index}] has {len(ids)} tokens, more than the maximum of "
                f"{max_seq}; shorten it, or send 'long_input': 'truncate' or 'chunk'",
                param="input",
                code="context_length_exceeded",
            )
        if len(ids) > fits and long_input == "error":
            raise TooLarge(
                f"input[{index}] has {len(ids)} tokens; the largest text that fits this "
                f"server's memory budget has {fits} tokens; shorten it, or send "
                "'long_input': 'truncate' or 'chunk'",
                param="input",
                code="input_too_large_for_memory",
            )
        fitted.append(Windows((tuple(encoder.truncate(ids, fits)),), 0))
    return fitted


def merged(
    ids: list[list[int]], windows: list[Windows], results: list[Embedding], timing: Timing
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
        timing,
        embedded_tokens=sum(w.tokens for w in windows) if chunked else None,
    )
