"""Compact vectors: what float16, int8 and binary cost in retrieval quality and bytes.

    python -m benchmarks.compact [--full-m3 | --no-full-m3] [--document-tokens 8000]

Every vector goes through the server's own encoder (``bge_trio.api.encoding``) and
back through the decoder docs/api.md gives clients; float32 is the truth.

- Dense, bundled all-MiniLM-L6-v2: the load corpus's 160 queries against its 160
  passages; recall@10 = how many of float32's ten best passages each encoding's
  scores also put in the ten best (binary ranks by Hamming distance), averaged
  over queries, and the largest per-value error.
- ColBERT, the tiny BGE-M3-layout model: the same queries and passages scored the
  ColBERT way (mean over query vectors of the best dot product); recall@10, top-1
  agreement and the largest score difference (binary vectors decoded to ±1/√d).
- Size and time, the full-size BGE-M3 stand-in (random weights; ``build_full_m3``,
  cached in ``~/.cache/bge-trio/bench``): one document of ``--document-tokens``
  tokens, every output from one forward pass (timed), then the response body of
  /v1/embeddings with all outputs built and serialised exactly as the route does,
  per encoding (timed, median of 3).

Writes ``docs/results/compact.json`` and generates its tables into ``docs/performance.md``
between its markers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from benchmarks.docs import DOCS, load_result, save_result
from benchmarks.harness import cpu_name, load_corpus, m3_standin
from benchmarks.reports.compact import table, write_tables
from bge_trio.api.encoding import encode_matrix, encode_vector
from bge_trio.api.schemas import EncodingFormat
from bge_trio.cgroups import cpu_count
from bge_trio.model.encoder import Encoder, Output
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.process import prepare_process
from bge_trio.testing import build_tiny_m3
from bge_trio.testing.docs import decoder_from_docs

F32 = npt.NDArray[np.float32]
FORMATS: tuple[EncodingFormat, ...] = ("base64", "float16", "int8", "binary")
ALL: frozenset[Output] = frozenset({"dense", "sparse", "colbert"})
decode = decoder_from_docs(DOCS / "api.md")


def _round_trip(vector: F32, fmt: EncodingFormat) -> F32:
    decoded = decode(encode_vector(vector, fmt), fmt, vector.shape[-1])
    if fmt == "binary":  # ±1 scaled to unit length, so scores stay comparable
        decoded = decoded / np.float32(np.sqrt(vector.shape[-1]))
    return decoded


def _embed(encoder: Encoder, texts: list[str], outputs: frozenset[Output]) -> list[Any]:
    ids = [encoder.truncate(x, encoder.info.max_seq_length) for x in encoder.tokenize(texts)]
    out = []
    for start in range(0, len(ids), 16):
        out += encoder.forward(ids[start : start + 16], outputs)
    return out


def _recall_at_10(truth: F32, scores: F32) -> float:
    hits = [
        len(set(np.argsort(-t, kind="stable")[:10]) & set(np.argsort(-s, kind="stable")[:10]))
        for t, s in zip(truth, scores, strict=True)
    ]
    return float(np.mean(hits)) / 10


def dense_quality(queries: list[str], passages: list[str]) -> dict[str, Any]:
    encoder = load_encoder(resolve_model("bundled"), dtype="fp32", threads=cpu_count())
    q = np.stack([e.dense for e in _embed(encoder, queries, frozenset({"dense"}))])
    p = np.stack([e.dense for e in _embed(encoder, passages, frozenset({"dense"}))])
    truth = q @ p.T
    result: dict[str, Any] = {"model": "all-MiniLM-L6-v2 (bundled)", "dimension": q.shape[1]}
    for fmt in FORMATS:
        dq = np.stack([_round_trip(v, fmt) for v in q])
        dp = np.stack([_round_trip(v, fmt) for v in p])
        error = float(np.abs(dp - p).max()) if fmt != "binary" else None
        result[fmt] = {"recall_at_10": _recall_at_10(truth, dq @ dp.T), "max_value_error": error}
    return result


def _colbert(queries: list[F32], passages: list[F32]) -> F32:
    return np.array(
        [[float((q @ p.T).max(axis=1).mean()) for p in passages] for q in queries],
        dtype=np.float32,
    )


def colbert_quality(queries: list[str], passages: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_encoder(
            resolve_model(str(build_tiny_m3(Path(tmp)))), dtype="fp32", threads=cpu_count()
        )
        q = [e.colbert for e in _embed(encoder, queries, frozenset({"colbert"}))]
        p = [e.colbert for e in _embed(encoder, passages, frozenset({"colbert"}))]
    truth = _colbert(q, p)
    result: dict[str, Any] = {"model": "tiny BGE-M3 layout", "dimension": q[0].shape[1]}
    for fmt in FORMATS:

        def trip(matrix: F32, fmt: EncodingFormat = fmt) -> F32:
            return np.stack([_round_trip(row, fmt) for row in matrix])

        scores = _colbert([trip(m) for m in q], [trip(m) for m in p])
        result[fmt] = {
            "recall_at_10": _recall_at_10(truth, scores),
            "top1_agreement": float(np.mean(truth.argmax(1) == scores.argmax(1))),
            "max_score_difference": float(np.abs(scores - truth).max()),
        }
    return result


def _median_s(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def document_size(tokens: int) -> dict[str, Any]:
    model = m3_standin()
    encoder = load_encoder(resolve_model(str(model)), dtype="fp32", threads=cpu_count())
    text = " ".join(row["text"] for row in load_corpus())
    ids = encoder.truncate(encoder.tokenize([text * 4])[0], tokens)
    start = time.perf_counter()
    (embedding,) = encoder.forward([ids], ALL)
    forward_s = time.perf_counter() - start
    dense, colbert, sparse = embedding.dense, embedding.colbert, embedding.sparse
    assert dense is not None
    assert colbert is not None
    assert sparse is not None
    result: dict[str, Any] = {
        "model": "BGE-M3 full-size stand-in (random weights)",
        "tokens": len(ids),
        "colbert_vectors": int(colbert.shape[0]),
        "forward_s": forward_s,
    }
    indices, values = sparse
    for fmt in ("float", *FORMATS):

        def body(fmt: EncodingFormat = fmt) -> bytes:
            item = {
                "object": "embedding",
                "index": 0,
                "embedding": encode_vector(dense, fmt),
                "sparse_values": {"indices": indices, "values": values},
                "colbert_embeddings": encode_matrix(colbert, fmt),
            }
            envelope = {"object": "list", "data": [item], "model": "bge-m3", "usage": {}}
            return orjson.dumps(envelope, option=orjson.OPT_SERIALIZE_NUMPY)

        seconds, raw = _median_s(body)
        result[fmt] = {"bytes": len(raw), "encode_s": seconds}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-m3", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--document-tokens", type=int, default=8000)
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the tables from compact.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("compact"))
        return
    prepare_process("predictable")
    corpus = load_corpus()
    queries = [row["text"] for row in corpus if row["kind"] == "query"]
    passages = [row["text"] for row in corpus if row["kind"] == "passage"]
    result: dict[str, Any] = {
        "setup": {
            "queries": len(queries),
            "passages": len(passages),
            "cpus": cpu_count(),
            "machine": cpu_name(),
        },
        "dense": dense_quality(queries, passages),
        "colbert": colbert_quality(queries, passages),
    }
    if args.full_m3:
        result["document"] = document_size(args.document_tokens)
    save_result("compact", result)
    write_tables(result)
    print(table(result))


if __name__ == "__main__":
    main()
