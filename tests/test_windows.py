"""Long inputs chunked into overlapping windows and merged back into one result each.

The server's merge is checked against the tiny model run through the independent
reference (tests/reference.py) on the same windows, split here by hand.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bge_trio.memory.cost import CostModel
from bge_trio.model.windows import split
from bge_trio.scheduler.batching import BatchPolicy
from tests.conftest import running_server
from tests.reference import ReferenceM3

CLS, EOS = 0, 2


@given(
    content=st.integers(0, 300),
    window=st.integers(8, 64),
    overlap=st.integers(0, 30),
)
def test_windows_cover_every_token_with_the_overlap_between_neighbours(
    content: int, window: int, overlap: int
) -> None:
    ids = [CLS, *range(100, 100 + content), EOS]
    if overlap >= window - 2:
        if len(ids) > window:
            with pytest.raises(ValueError, match="no room"):
                split(ids, window, overlap, frozenset({EOS}))
        return
    windows = split(ids, window, overlap, frozenset({EOS}))
    parts = windows.token_ids
    assert all(len(w) <= window for w in parts)
    assert all(w[0] == CLS and w[-1] == EOS for w in parts)
    bodies = [list(w[1:-1]) for w in parts]
    for before, after in itertools.pairwise(bodies):
        assert before[len(before) - overlap :] == after[:overlap]  # shared tokens
    rebuilt = bodies[0] + [t for body in bodies[1:] for t in body[overlap:]]
    assert rebuilt == ids[1:-1]  # every content token once, in order
    assert windows.tokens == sum(len(w) for w in parts)
    if len(ids) <= window:
        assert parts == (tuple(ids),)


def _manual_windows(ids: list[int], window: int, overlap: int) -> list[list[int]]:
    body = ids[1:-1]
    size = window - 2
    out, start = [], 0
    while True:
        out.append([ids[0], *body[start : start + size], ids[-1]])
        if start + size >= len(body):
            return out
        start += size - overlap


LONG = " ".join(f"word{i % 37} thing{i % 11}" for i in range(60))


async def test_chunked_input_matches_the_reference_on_the_same_windows(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    window, overlap = 24, 5
    settings = settings_for(
        tiny_model_dir, max_seq_length=48, chunk_window=window, chunk_overlap=overlap
    )
    ids = reference.ids(LONG)
    assert len(ids) > 3 * window
    windows = _manual_windows(ids, window, overlap)
    outs = reference.encode_ids(windows)
    counts = np.array([len(w) for w in windows], dtype=np.float64)
    dense = sum(c * o.dense for c, o in zip(counts, outs, strict=True)) / counts.sum()
    dense = dense / np.linalg.norm(dense)
    sparse: dict[int, float] = {}
    for o in outs:
        for token, w in o.sparse.items():
            sparse[token] = max(sparse.get(token, 0.0), w)
    colbert = [outs[0].colbert[:-1]]
    colbert += [o.colbert[overlap:-1] for o in outs[1:]]
    colbert.append(outs[-1].colbert[-1:])
    colbert_all = np.concatenate(colbert)

    async with running_server(settings) as server:
        body = {"input": [LONG, "short one"], "long_input": "chunk"}
        both = await server.client.post("/v1/embeddings:both", json=body)
        assert both.status_code == 200, both.text
        col = await server.client.post("/v1/colbert-embeddings", json=body)
        assert col.status_code == 200, col.text
        truncated = await server.client.post(
            "/v1/embeddings", json={**body, "long_input": "truncate"}
        )
        refused = await server.client.post("/v1/embeddings", json={**body, "long_input": "error"})

    item = both.json()["data"][0]
    np.testing.assert_allclose(item["embedding"], dense, atol=2e-5)
    got_sparse = dict(
        zip(item["sparse_values"]["indices"], item["sparse_values"]["values"], strict=True)
    )
    assert got_sparse.keys() == sparse.keys()
    for token, weight in sparse.items():
        assert got_sparse[token] == pytest.approx(weight, abs=2e-5)
    vectors = np.array(col.json()["data"][0]["embeddings"])
    assert vectors.shape == (len(ids) - 1, colbert_all.shape[1])  # as many as unsplit
    np.testing.assert_allclose(vectors, colbert_all, atol=2e-5)
    # usage counts every token embedded, the overlaps in each of their windows
    short = len(reference.ids("short one"))
    assert both.json()["usage"]["prompt_tokens"] == counts.sum() + short
    assert truncated.json()["usage"]["prompt_tokens"] == 48 + short
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert "'long_input'" in refused.json()["error"]["message"]


async def test_chunks_are_as_long_as_the_memory_budget_allows(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    """Where the budget allows fewer tokens in one pass than the model, the windows are
    that long (and overlap by at most half of one): each window is a pass that fits."""
    async with running_server(settings_for(tiny_model_dir)) as server:
        # a workspace of 12 bytes at 1 byte per token: no pass of more than 12 tokens
        server.scheduler.set_policy(BatchPolicy(CostModel(1.0, 0.0), 12.0))
        ids = reference.ids(LONG)
        body = {"input": [LONG], "long_input": "chunk"}
        r = await server.client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    windows = _manual_windows(ids, 12, 5)  # overlap: at most (12 - 2) // 2 tokens
    assert max(len(w) for w in windows) == 12
    outs = reference.encode_ids(windows)
    counts = np.array([len(w) for w in windows], dtype=np.float64)
    dense = sum(c * o.dense for c, o in zip(counts, outs, strict=True)) / counts.sum()
    expected = dense / np.linalg.norm(dense)
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=2e-5)
    assert r.json()["usage"]["prompt_tokens"] == counts.sum()


async def test_unknown_long_input_policy_is_a_400_naming_the_choices(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    async with running_server(settings_for(tiny_model_dir)) as server:
        r = await server.client.post("/v1/embeddings", json={"input": "x", "long_input": "split"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "long_input"
    assert "truncate, error, chunk" in error["message"]
