"""The server inside a real memory cgroup, hammered with long texts, is never OOM-killed."""

from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from bge_trio.memory.allocator import HUGE_PAGES, huge_pages_on_request
from bge_trio.testing import build_tiny_reranker
from bge_trio.testing.processes import HYPERCORN, env_for, serving
from tests.conftest import MEMORY_CGROUP_LIMIT

pytestmark = pytest.mark.slow  # servers in a real memory cgroup


@pytest.mark.heavy
@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_hammered_with_max_length_batches_inside_a_memory_limit(
    backend: str, memory_cgroup: Path, tmp_path: Path
) -> None:
    """On either backend: OpenVINO's conversion, its two compiled models and its workspace
    (handed back after each large pass) stay inside the limit the probe planned for; torch's
    passes on huge pages where the kernel gives them."""
    server = [sys.executable, "-m", "bge_trio.cli", "serve", "--model", "bundled", "--port", "0"]
    command = f"echo $$ > {memory_cgroup / 'cgroup.procs'}; exec {shlex.join(server)}"
    env = env_for(
        tmp_path,
        dtype="fp32",  # sizes below are fp32's
        BGE_TRIO_PROBE="auto",
        BGE_TRIO_MEMORY_HEADROOM_BYTES=str(128 << 20),
        BGE_TRIO_MAX_QUEUE_ITEMS="512",
        # no token cap of its own (the default, 1,024 tokens, is four of these texts): the
        # memory budget alone sizes the batches
        BGE_TRIO_MAX_BATCH_TOKENS=str(1 << 24),
        # a deadline that admits the whole burst: every request is answered in full
        BGE_TRIO_REQUEST_TIMEOUT_S="600",
        BGE_TRIO_BACKEND=backend,
    )
    answers: list[httpx.Response] = []
    clients = {"torch": 6, "openvino": 3}[backend]  # requests of 48 texts
    with serving(["sh", "-c", command], env) as served:
        url = served.url
        health = httpx.get(url + "/health").json()
        assert httpx.get(url + "/info").json()["backend"] == backend
        # the predictable allocator on huge pages where the kernel gives them (the server
        # started itself again with glibc's tunable): their memory is what is measured here
        environ = Path(f"/proc/{served.process.pid}/environ").read_bytes().split(b"\0")
        on_huge_pages = f"GLIBC_TUNABLES={HUGE_PAGES}".encode() in environ
        assert on_huge_pages == huge_pages_on_request()
        assert health["memory_limit_bytes"] == MEMORY_CGROUP_LIMIT
        assert health["memory_limit_source"].startswith("cgroup1:")
        text = "memory safety under a hard limit " * 80  # past the 256-token maximum

        def client() -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                answers.append(http.post("/v1/embeddings", json={"input": [text] * 48}))

        # on torch 288 texts at once: about six batches at the budget (about 50 texts
        # here), more than one pass could hold in the limit; OpenVINO's own memory (the
        # conversion, two compiled models, their buffers) is the point of the other, and
        # half as many make more than two batches
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert served.process.poll() is None, "the server died:\n" + "".join(served.stderr[-20:])
        assert httpx.get(url + "/health").status_code == 200
    _assert_never_killed(memory_cgroup)
    _assert_never_at_the_limit(memory_cgroup)
    assert [r.status_code for r in answers] == [200] * clients
    # one text, cut alike in every batch: one vector, whatever batch it was in
    vectors = np.array([item["embedding"] for r in answers for item in r.json()["data"]])
    assert vectors.shape == (clients * 48, 384)
    np.testing.assert_allclose(vectors, np.broadcast_to(vectors[0], vectors.shape), atol=1e-5)


@pytest.mark.heavy
def test_an_embedder_and_a_reranker_in_one_hypercorn_process_inside_a_memory_limit(
    memory_cgroup: Path, tmp_path: Path
) -> None:
    """Both models of one ``hypercorn --worker-class trio`` process, in a cgroup sized for
    both plus a small workspace, under mixed traffic: long embeddings and reranks of many
    long documents at once. Never OOM-killed, never at the limit, every request answered
    in full."""
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
        # Admission is not what this test is about: a deadline that admits the whole burst,
        # so both models' passes run side by side at the budget on any CPU.
        BGE_TRIO_REQUEST_TIMEOUT_S="600",
    )
    answers: list[tuple[str, httpx.Response]] = []
    with serving(["sh", "-c", command], env) as served:
        url = served.url
        health = httpx.get(url + "/health").json()
        assert set(health["models"]) == {"minilm", "reranker"}
        for model in health["models"].values():
            assert model["memory_limit_bytes"] == MEMORY_CGROUP_LIMIT
        text = "memory safety under a hard limit " * 80  # past both models' maxima
        document = "memory safety under a hard limit " * 30  # about 250 tokens

        def embedder() -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                body = {"model": "minilm", "input": [text] * 48}
                answers.append(("embed", http.post("/v1/embeddings", json=body)))

        def reranking() -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                body = {"query": "is memory safe?", "documents": [document] * 48}
                answers.append(("rerank", http.post("/v1/rerank", json=body)))

        threads = [threading.Thread(target=f) for f in (embedder, reranking) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert served.process.poll() is None, "the server died:\n" + "".join(served.stderr[-20:])
        assert httpx.get(url + "/health").status_code == 200
    _assert_never_killed(memory_cgroup)
    _assert_never_at_the_limit(memory_cgroup)
    assert sorted((kind, r.status_code) for kind, r in answers) == [
        ("embed", 200),
        ("embed", 200),
        ("rerank", 200),
        ("rerank", 200),
    ]
    for kind, r in answers:
        if kind == "embed":
            assert len(r.json()["data"]) == 48
        else:  # one document, one score, whichever pass it was in
            scores = [result["relevance_score"] for result in r.json()["results"]]
            assert len(scores) == 48
            assert max(scores) - min(scores) < 1e-4


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
