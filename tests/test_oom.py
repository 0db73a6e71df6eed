"""The server inside a real memory cgroup, hammered with long texts, is never OOM-killed."""

from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

import httpx
import pytest

from bge_trio.testing import build_tiny_reranker
from tests.conftest import MEMORY_CGROUP_LIMIT
from tests.processes import HYPERCORN, env_for, serving

pytestmark = pytest.mark.slow  # servers in a real memory cgroup


def test_hammered_with_max_length_batches_inside_a_memory_limit(
    memory_cgroup: Path, tmp_path: Path
) -> None:
    server = [sys.executable, "-m", "bge_trio.cli", "serve", "--model", "bundled", "--port", "0"]
    command = f"echo $$ > {memory_cgroup / 'cgroup.procs'}; exec {shlex.join(server)}"
    env = env_for(
        tmp_path,
        dtype="fp32",  # sizes below are fp32's
        BGE_TRIO_PROBE="auto",
        BGE_TRIO_MEMORY_HEADROOM_BYTES=str(128 << 20),
        BGE_TRIO_MAX_QUEUE_ITEMS="512",
    )
    statuses: list[int] = []
    with serving(["sh", "-c", command], env) as served:
        url = served.url
        health = httpx.get(url + "/health").json()
        assert health["memory_limit_bytes"] == MEMORY_CGROUP_LIMIT
        assert health["memory_limit_source"].startswith("cgroup1:")
        text = "memory safety under a hard limit " * 80  # past the 256-token maximum

        def client() -> None:
            with httpx.Client(base_url=url, timeout=300) as http:
                for _ in range(2):
                    r = http.post("/v1/embeddings", json={"input": [text] * 64})
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert served.process.poll() is None, "the server died:\n" + "".join(served.stderr[-20:])
        assert httpx.get(url + "/health").status_code == 200
    _assert_never_killed(memory_cgroup)
    assert len(statuses) == 16
    assert set(statuses) <= {200, 413, 429}
    assert 200 in statuses
    _assert_never_at_the_limit(memory_cgroup)


def test_an_embedder_and_a_reranker_in_one_hypercorn_process_inside_a_memory_limit(
    memory_cgroup: Path, tmp_path: Path
) -> None:
    """Both models of one ``hypercorn --worker-class trio`` process, in a cgroup sized for
    both plus a small workspace, under mixed traffic: long embeddings and reranks of many
    long documents at once. Never OOM-killed, never at the limit, every answer 200, 413
    or 429."""
    reranker = build_tiny_reranker(
        tmp_path / "reranker", hidden_size=384, layers=6, heads=6, intermediate_size=1536
    )
    command = f"echo $$ > {memory_cgroup / 'cgroup.procs'}; exec {shlex.join(HYPERCORN)}"
    env = env_for(
        tmp_path,
        dtype="fp32",  # sizes below are fp32's
        BGE_TRIO_MODEL=f"minilm=bundled,reranker={reranker}",
        BGE_TRIO_PROBE="auto",
        BGE_TRIO_MEMORY_HEADROOM_BYTES=str(128 << 20),
        BGE_TRIO_MAX_QUEUE_ITEMS="512",
        BGE_TRIO_REQUEST_TIMEOUT_S="120",
    )
    statuses: list[tuple[str, int]] = []
    with serving(["sh", "-c", command], env) as served:
        url = served.url
        health = httpx.get(url + "/health").json()
        assert set(health["models"]) == {"minilm", "reranker"}
        for model in health["models"].values():
            assert model["memory_limit_bytes"] == MEMORY_CGROUP_LIMIT
        text = "memory safety under a hard limit " * 80  # past both models' maxima
        document = "memory safety under a hard limit " * 30  # about 250 tokens

        def embedder() -> None:
            with httpx.Client(base_url=url, timeout=300) as http:
                for _ in range(2):
                    body = {"model": "minilm", "input": [text] * 64}
                    statuses.append(("embed", http.post("/v1/embeddings", json=body).status_code))

        def reranking() -> None:
            with httpx.Client(base_url=url, timeout=300) as http:
                for _ in range(2):
                    body = {"query": "is memory safe?", "documents": [document] * 100}
                    statuses.append(("rerank", http.post("/v1/rerank", json=body).status_code))

        threads = [threading.Thread(target=f) for f in (embedder, reranking) * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert served.process.poll() is None, "the server died:\n" + "".join(served.stderr[-20:])
        assert httpx.get(url + "/health").status_code == 200
    _assert_never_killed(memory_cgroup)
    assert len(statuses) == 16
    assert {status for _, status in statuses} <= {200, 413, 429}
    assert ("embed", 200) in statuses
    assert ("rerank", 200) in statuses
    _assert_never_at_the_limit(memory_cgroup)


def _assert_never_killed(cgroup: Path) -> None:
    oom = dict(line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines())
    assert oom.get("oom_kill", "0") == "0"


def _assert_never_at_the_limit(cgroup: Path) -> None:
    """The kernel caps usage at the limit anyway; what matters is that it was never reached
    (no forced reclaim, no allocation stalled at the limit)."""
    failcnt = int((cgroup / "memory.failcnt").read_text())
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    assert failcnt == 0, f"the limit was hit {failcnt} times (peak {peak} bytes)"
    assert peak < MEMORY_CGROUP_LIMIT
