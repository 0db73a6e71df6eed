"""The same model in the benchmark's own process: what the server is measured against.

No HTTP, no queue: the corpus length-sorted into batches through ``Encoder.forward``
(the ideal a server's throughput is divided by), one short query's tokenise-and-forward,
and the agreement of one encoder's outputs with another's (a dtype against fp32).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from bge_trio.model.encoder import Encoder


def averaged(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The mean of ideal runs taken before and after the server's scenarios.

    On a shared machine the CPU's speed drifts over minutes; measuring the ideal on
    both sides of the server's run, and showing both, keeps the ratio honest.
    """
    out: dict[str, Any] = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
    out["runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
    return out


def ideal(
    encoder: Encoder, texts: list[str], max_tokens: int = 1024, workers: int = 1
) -> dict[str, float]:
    """The same texts in this process, length-sorted and cut into batches of at most
    ``max_tokens`` padded tokens (the server's default cap): no HTTP, no queue.

    With ``workers`` > 1 the batches are shared among that many threads running
    passes at once, as a server with BGE_TRIO_WORKERS does (load the encoder with
    cores / workers threads to match it).
    """
    ids = encoder.tokenize(texts)
    ids = [encoder.truncate(x, encoder.info.max_seq_length) for x in ids]
    batches: list[list[list[int]]] = [[]]
    for seq in sorted(ids, key=len):
        if batches[-1] and (len(batches[-1]) + 1) * len(seq) > max_tokens:
            batches.append([])
        batches[-1].append(seq)
    if workers == 1:  # on this thread: a second OpenMP team would slow both (see threads.py)
        encoder.forward(batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            encoder.forward(batch)
        elapsed = time.perf_counter() - started
        return {
            "texts_per_s": len(ids) / elapsed,
            "tokens_per_s": sum(len(x) for x in ids) / elapsed,
        }
    queue = list(reversed(batches))
    lock = threading.Lock()

    def work() -> None:
        encoder.forward(batches[0])  # warm-up of this thread
        barrier.wait()
        while True:
            with lock:
                if not queue:
                    return
                batch = queue.pop()
            encoder.forward(batch)

    barrier = threading.Barrier(workers + 1)
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "texts_per_s": len(ids) / elapsed,
        "tokens_per_s": sum(len(x) for x in ids) / elapsed,
    }


def raw_query_latency(encoder: Encoder, queries: list[str]) -> float:
    """p50 of tokenise + forward for one short query, in-process."""
    samples = []
    for text in queries:
        started = time.perf_counter()
        encoder.forward(encoder.tokenize([text]))
        samples.append(time.perf_counter() - started)
    return float(np.percentile(np.array(samples) * 1000, 50))


def quality(reference: Encoder, variant: Encoder, texts: list[str]) -> dict[str, float]:
    ids = [reference.truncate(x, reference.info.max_seq_length) for x in reference.tokenize(texts)]
    outputs = reference.info.outputs
    cosines, overlaps, colbert = [], [], []
    for i in range(0, len(ids), 16):
        chunk = ids[i : i + 16]
        for a, b in zip(
            reference.forward(chunk, outputs), variant.forward(chunk, outputs), strict=True
        ):
            assert a.dense is not None
            assert b.dense is not None
            cosines.append(float(a.dense @ b.dense))
            if a.sparse is not None and b.sparse is not None:
                sa, sb = set(a.sparse[0].tolist()), set(b.sparse[0].tolist())
                overlaps.append(len(sa & sb) / max(1, len(sa | sb)))
            if a.colbert is not None and b.colbert is not None:
                colbert.append(float(np.mean(np.sum(a.colbert * b.colbert, axis=1))))
    out = {"dense_cosine_min": min(cosines), "dense_cosine_mean": float(np.mean(cosines))}
    if overlaps:
        out["sparse_jaccard_mean"] = float(np.mean(overlaps))
    if colbert:
        out["colbert_cosine_mean"] = float(np.mean(colbert))
    return out
