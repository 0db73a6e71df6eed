"""Long inputs as overlapping windows, merged back into one result per input.

A text longer than the model (or the memory budget) allows is split into windows of
at most ``window`` tokens: each keeps the text's opening and closing special tokens
(``<s> … </s>``) around a slice of its content, and consecutive slices share
``overlap`` tokens, so no token is embedded without some context on both sides
(except at the text's ends). The windows' outputs are merged so that a client gets
one result per input, in the shapes an unsplit text has:

* dense: the mean of the windows' vectors weighted by their token counts, then
  re-normalised (a longer window says more about the text);
* sparse: for every token id, its largest weight in any window (as FlagEmbedding
  keeps the largest weight of a token id repeated within one text);
* ColBERT: every content token's vector once (the overlap's second copy is dropped),
  then the closing token's vector from the last window: as many vectors as the
  unsplit text would have (its length less the opening token).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from bge_trio.model.encoder import Embedding, FloatArray


@attrs.frozen
class Windows:
    """How one input was split: each window's token ids and its first new content token."""

    token_ids: tuple[tuple[int, ...], ...]
    overlap: int
    closed: bool = True  # every window ends with the text's closing special token

    @property
    def tokens(self) -> int:
        """Every token embedded (overlaps counted in each window they are in)."""
        return sum(len(ids) for ids in self.token_ids)


def split(ids: Sequence[int], window: int, overlap: int, closing_ids: frozenset[int]) -> Windows:
    """Split ``ids`` (with its special tokens) into windows of at most ``window`` tokens.

    The first token is taken as the opening special token; the last one as the closing
    one when it is in ``closing_ids``. ``overlap`` must leave each window new content.
    """
    if len(ids) <= window:
        return Windows((tuple(ids),), overlap, ids[-1] in closing_ids if ids else False)
    opening = [ids[0]]
    closing = [ids[-1]] if ids[-1] in closing_ids else []
    content = list(ids[1 : len(ids) - len(closing)])
    size = window - len(opening) - len(closing)
    if size <= overlap:
        raise ValueError(f"a window of {window} tokens leaves no room past an overlap of {overlap}")
    step = size - overlap
    windows = []
    start = 0
    while True:
        windows.append((*opening, *content[start : start + size], *closing))
        if start + size >= len(content):
            break
        start += step
    return Windows(tuple(windows), overlap, bool(closing))


def merge(parts: Sequence[Embedding], windows: Windows) -> Embedding:
    """One input's result from its windows' results (in window order)."""
    if len(parts) == 1:
        return parts[0]
    counts = np.array([len(ids) for ids in windows.token_ids], dtype=np.float32)
    return Embedding(
        dense=_dense(parts, counts),
        sparse=_sparse(parts),
        colbert=_colbert(parts, windows.overlap, windows.closed),
    )


def _dense(parts: Sequence[Embedding], counts: FloatArray) -> FloatArray | None:
    vectors = [p.dense for p in parts if p.dense is not None]
    if len(vectors) < len(parts):
        return None
    mean: FloatArray = (np.stack(vectors) * counts[:, None]).sum(axis=0) / counts.sum()
    norm = float(np.linalg.norm(mean))
    return mean / np.float32(norm) if norm > 0 else mean


def _sparse(parts: Sequence[Embedding]) -> tuple[npt.NDArray[np.int64], FloatArray] | None:
    pairs = [p.sparse for p in parts]
    if any(pair is None for pair in pairs):
        return None
    ids = np.concatenate([pair[0] for pair in pairs if pair is not None])
    weights = np.concatenate([pair[1] for pair in pairs if pair is not None])
    unique, inverse = np.unique(ids, return_inverse=True)
    values = np.zeros(len(unique), dtype=np.float32)
    np.maximum.at(values, inverse, weights)
    return unique, values


def _colbert(parts: Sequence[Embedding], overlap: int, closed: bool) -> FloatArray | None:
    blocks = [p.colbert for p in parts if p.colbert is not None]
    if len(blocks) < len(parts):
        return None
    # Each window's vectors: its content tokens, then (if it has one) the closing token.
    kept = []
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        body = block[:-1] if closed and index < last else block
        kept.append(body[overlap:] if index > 0 else body)
    return np.concatenate(kept).astype(np.float32)
