"""Hybrid relevance scores, exactly as FlagEmbedding's ``BGEM3FlagModel.compute_score``.

For a query q and a passage p:

* dense: ``q · p`` of the normalised CLS vectors;
* sparse (lexical): ``Σ w_q(t) · w_p(t)`` over the token ids t they share;
* ColBERT: for every query vector the best dot product with any passage vector,
  averaged over the query vectors;
* ``sparse+dense`` and ``colbert+sparse+dense``: the weighted sums of those
  scores divided by the sum of the weights used (weights are [dense, sparse,
  colbert], [1, 1, 1] by default).

Everything is vectorised over the documents of one query: one matrix product for
dense, one ``bincount`` for sparse, one matrix product and a segmented max
(``maximum.reduceat``) for ColBERT. Call from a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from bge_trio.model.encoder import Embedding, Output

F32 = npt.NDArray[np.float32]
T = TypeVar("T")
MODES: tuple[Output, ...] = ("dense", "sparse", "colbert")


@attrs.frozen
class Weights:
    dense: float = 1.0
    sparse: float = 1.0
    colbert: float = 1.0

    def of(self, mode: Output) -> float:
        return float(getattr(self, mode))


def score_matrix(
    queries: Sequence[Embedding], documents: Sequence[Embedding], modes: Sequence[Output]
) -> dict[str, F32]:
    """Per-mode (n_queries, n_documents) score matrices for the modes available."""
    scores: dict[str, F32] = {}
    if "dense" in modes:
        q = np.stack([_need(e.dense) for e in queries])
        d = np.stack([_need(e.dense) for e in documents])
        scores["dense"] = (q @ d.T).astype(np.float32)
    if "sparse" in modes:
        scores["sparse"] = _sparse_scores(queries, documents)
    if "colbert" in modes:
        scores["colbert"] = _colbert_scores(queries, documents)
    return scores


def combine(scores: dict[str, F32], weights: Weights) -> dict[str, F32]:
    """Add FlagEmbedding's weighted combinations, and ``hybrid`` over every mode available.

    A combination whose weights sum to zero is left out (it would be 0 / 0).
    """
    out = dict(scores)
    used = tuple(mode for mode in MODES if mode in scores)
    for name, modes in (
        ("sparse+dense", ("dense", "sparse")),
        ("colbert+sparse+dense", MODES),
        ("hybrid", used),
    ):
        shares = _shares([weights.of(mode) for mode in modes])
        if shares is not None and all(mode in scores for mode in modes):
            combined = np.zeros_like(scores[modes[0]])
            for mode, share in zip(modes, shares, strict=True):
                combined += scores[mode] * np.float32(share)
            out[name] = combined
    return out


def _shares(weights: list[float]) -> list[float] | None:
    """Each weight's share of their sum, or None when they sum to zero.

    Computed in float64 after scaling by the largest, so neither tiny weights (5e-324,
    zero in float32) nor huge ones (whose sum overflows) lose the ratio between them.
    """
    largest = max(weights)
    if not largest > 0:
        return None
    scaled = [w / largest for w in weights]
    total = sum(scaled)
    return [w / total for w in scaled]


def _sparse_scores(queries: Sequence[Embedding], documents: Sequence[Embedding]) -> F32:
    doc_sparse = [_need(e.sparse) for e in documents]
    owner = np.concatenate(
        [np.full(len(ids), i, dtype=np.int64) for i, (ids, _) in enumerate(doc_sparse)]
    )
    tokens = np.concatenate([ids for ids, _ in doc_sparse])
    weights = np.concatenate([w for _, w in doc_sparse]).astype(np.float32)
    out = np.zeros((len(queries), len(documents)), dtype=np.float32)
    for row, query in enumerate(queries):
        q_ids, q_w = _need(query.sparse)  # ascending ids
        if not len(q_ids) or not len(tokens):
            continue
        shared = np.isin(tokens, q_ids)
        position = np.searchsorted(q_ids, tokens[shared])
        contribution = q_w[position] * weights[shared]
        out[row] = np.bincount(owner[shared], contribution, minlength=len(documents))
    return out


def _colbert_scores(queries: Sequence[Embedding], documents: Sequence[Embedding]) -> F32:
    doc_vecs = [_need(e.colbert) for e in documents]
    starts = np.cumsum([0] + [len(v) for v in doc_vecs[:-1]])
    stacked = np.concatenate(doc_vecs)
    out = np.zeros((len(queries), len(documents)), dtype=np.float32)
    for row, query in enumerate(queries):
        q = _need(query.colbert)
        similarity = q @ stacked.T  # (query tokens, all document tokens)
        best = np.maximum.reduceat(similarity, starts, axis=1)  # (query tokens, documents)
        out[row] = best.sum(axis=0) / len(q)
    return out


def _need(value: T | None) -> T:
    if value is None:  # pragma: no cover - the service returns what was asked for
        raise ValueError("missing output")
    return value
