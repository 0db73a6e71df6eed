"""BGE-M3's full vocabulary: the budget counts every weight before traffic faults it in.

A stand-in with BAAI/bge-m3's 250,002 x 1024 embedding matrix and no encoder layers
(what is tested is where the weights' pages live, not the layers' work: a pass is the
embeddings and the heads) in a real server process; token ids spread over the whole
vocabulary; the process's own resident size read from /proc. With the weights left
memory-mapped (not copied into the process), this test fails.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bge_trio.testing import build_full_m3
from bge_trio.testing.processes import bge_trio, env_for, serving
from bge_trio.testing.tiny_m3 import M3_HIDDEN_SIZE, M3_VOCAB_SIZE

pytestmark = pytest.mark.slow  # a server process over a 1 GB stand-in


@pytest.fixture(scope="session")
def shallow_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_full_m3(tmp_path_factory.mktemp("m3-no-layers"), layers=0)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_passes_over_the_whole_vocabulary_stay_within_the_budgeted_resident_size(
    shallow_m3_dir: Path, tmp_path: Path
) -> None:
    headroom = 256 << 20
    command = [*bge_trio(), "serve", "--model", str(shallow_m3_dir), "--port", "0"]
    env = env_for(
        tmp_path,
        dtype="fp32",  # sizes below are fp32's
        BGE_TRIO_MAX_SEQ_LENGTH="2048",
        BGE_TRIO_MEMORY_HEADROOM_BYTES=str(headroom),
        BGE_TRIO_MAX_BATCH_TOKENS="16384",
    )
    with serving(command, env) as served:
        health = httpx.get(served.url + "/health").json()
        embedding_matrix = M3_VOCAB_SIZE * M3_HIDDEN_SIZE * 4
        # every weight counted, resident or not yet touched
        assert health["resident_weights_bytes"] >= embedding_matrix
        assert health["model_resident_bytes"] >= (
            health["resident_weights_bytes"] + health["resident_runtime_bytes"]
        )
        assert health["resident_runtime_bytes"] > 0
        budgeted = health["model_resident_bytes"]
        # every other token id of the vocabulary, in 2000-token texts
        ids = list(range(5, M3_VOCAB_SIZE, 2))
        texts = [ids[i : i + 2000] for i in range(0, len(ids), 2000)]
        with httpx.Client(base_url=served.url, timeout=600) as http:
            for start in range(0, len(texts), 8):
                r = http.post(
                    "/v1/embeddings",
                    json={"input": texts[start : start + 8], "encoding_format": "base64"},
                )
                assert r.status_code == 200, r.text
        rss = _rss(served.process.pid)
    assert rss <= budgeted + headroom, (
        f"resident {rss / 2**20:.0f} MiB after the whole vocabulary, budgeted "
        f"{budgeted / 2**20:.0f} MiB + {headroom / 2**20:.0f} MiB headroom"
    )
