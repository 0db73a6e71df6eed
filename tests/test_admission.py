"""Admission from the first second: every request is answered, or refused at once.

A server that admits work it cannot finish by the deadline answers 504 after the client
waited the whole deadline. From the moment /health says ready, admission must already
know the pace (from the probe's passes, or passes timed at startup where the probe timed
none), count the passes running, and refuse what would end past the deadline with a 429,
or a request that is too slow even alone with a 413, at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import SettingsFactory, running_server
from tests.processes import bge_trio, env_for, serving

DEADLINE_S = 10.0
TOKENS = 500  # token ids per text, so every text is exactly this long


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["off", "auto"])
def test_requests_from_the_first_second_are_answered_or_refused_at_once(
    tmp_path: Path, probe: str
) -> None:
    command = [*bge_trio(), "serve", "--model", "bundled", "--port", "0"]
    env = env_for(
        tmp_path,
        dtype="fp32",
        BGE_TRIO_PROBE=probe,
        BGE_TRIO_WORKERS="2",
        BGE_TRIO_MAX_SEQ_LENGTH="512",
        BGE_TRIO_MEMORY_LIMIT_BYTES=str(1500 << 20),
        BGE_TRIO_REQUEST_TIMEOUT_S=str(DEADLINE_S),
    )
    rng = np.random.default_rng(0)
    answers: list[tuple[int, float, str]] = []
    with serving(command, env) as server:  # returns as soon as /health is 200

        def client(texts: int, seed: int) -> None:
            ids = np.random.default_rng(seed).integers(1000, 30000, size=(texts, TOKENS))
            with httpx.Client(base_url=server.url, timeout=3 * DEADLINE_S) as http:
                for _ in range(2):
                    sent = time.monotonic()
                    r = http.post("/v1/embeddings", json={"input": ids.tolist()})
                    code = r.json()["error"]["code"] if r.status_code != 200 else ""
                    answers.append((r.status_code, time.monotonic() - sent, code))

        sizes = rng.choice([8, 32, 128], size=16)
        threads = [
            threading.Thread(target=client, args=(int(n), seed)) for seed, n in enumerate(sizes)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10 * DEADLINE_S)
        assert server.process.poll() is None
    statuses = sorted({status for status, _, _ in answers})
    assert len(answers) == 32
    assert 504 not in statuses, "; ".join(f"{s} {t:.1f}s {c}" for s, t, c in sorted(answers))
    assert set(statuses) <= {200, 413, 429}, answers
    assert 200 in statuses, answers
    for status, seconds, code in answers:
        if status != 200:  # refused at once, not after waiting
            assert seconds < DEADLINE_S / 4, (status, seconds, code)


async def test_the_pace_is_known_when_the_server_is_ready_without_a_probe(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    """Where no probe timed passes (``BGE_TRIO_PROBE=off``), startup times a few itself:
    the first request is judged at a measured pace, not admitted blind."""
    async with running_server(settings_for(tiny_model_dir, probe="off")) as server:
        statistics = server.stats()
        assert statistics.pace_curve is not None
        assert statistics.forwarded_items == 0  # known before any request ran
