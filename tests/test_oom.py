"""The server inside a real memory cgroup, hammered with long texts, is never OOM-killed."""

from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

import httpx

from tests.conftest import MEMORY_CGROUP_LIMIT
from tests.processes import env_for, serving


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
    oom = dict(
        line.split() for line in (memory_cgroup / "memory.oom_control").read_text().splitlines()
    )
    assert oom.get("oom_kill", "0") == "0"
    assert len(statuses) == 16
    assert set(statuses) <= {200, 413, 429}
    assert 200 in statuses
    # The kernel caps usage at the limit anyway; what matters is that it was never reached
    # (no forced reclaim, no allocation stalled at the limit).
    failcnt = int((memory_cgroup / "memory.failcnt").read_text())
    peak = int((memory_cgroup / "memory.max_usage_in_bytes").read_text())
    assert failcnt == 0, f"the limit was hit {failcnt} times (peak {peak} bytes)"
    assert peak < MEMORY_CGROUP_LIMIT
