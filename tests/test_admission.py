"""Admission from the first second: every request is answered, or refused at once.

A server that admits work it cannot finish by the deadline answers 504 after the client
waited the whole deadline. From the moment /health says ready, admission must already
know the pace (from the probe's passes, or passes timed at startup where the probe timed
none), count the passes running, and refuse what would end past the deadline with a 429,
or a request that is too slow even alone with a 413, at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import httpx
import numpy as np
import pytest
import trio

from bge_trio.testing.processes import bge_trio, env_for, serving
from tests.conftest import SettingsFactory, running_server
from tests.encoders import loader_with
from tests.test_gate import ControllableProbe

DEADLINE_S = 6.0
TOKENS = 500  # token ids per text, so every text is exactly this long


@pytest.mark.slow
@pytest.mark.alone
def test_requests_from_the_first_second_are_answered_or_refused_at_once(tmp_path: Path) -> None:
    """With two workers the first pace is timed at startup on both at once, whether the
    probe ran or not (engine/startup.py): one server, with the default probe, is the
    case; which passes seed the pace is tested in this process below."""
    command = [*bge_trio(), "serve", "--model", "bundled", "--port", "0"]
    env = env_for(
        tmp_path,
        dtype="fp32",
        BGE_TRIO_PROBE="auto",
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


@pytest.mark.alone
async def test_the_pace_is_known_when_the_server_is_ready_without_a_probe(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    """Where no probe timed passes (``BGE_TRIO_PROBE=off``), startup times a few itself:
    the first request is judged at a measured pace, not admitted blind."""
    async with running_server(settings_for(tiny_model_dir, probe="off")) as server:
        statistics = server.stats()
        assert statistics.pace_curve is not None
        assert statistics.forwarded_items == 0  # known before any request ran


@attrs.define
class HeldPasses:
    """The real model, whose passes wait for ``release`` once ``engaged`` (so startup's
    timed passes run freely)."""

    engaged: threading.Event = attrs.field(factory=threading.Event)
    started: threading.Event = attrs.field(factory=threading.Event)
    release: threading.Event = attrs.field(factory=threading.Event)

    def hold(self, batch: Sequence[Sequence[int]]) -> None:
        if self.engaged.is_set():
            self.started.set()
            assert self.release.wait(timeout=60)


def _ids(length: int, seed: int) -> list[int]:
    """A text of exactly ``length`` token ids of the tiny model (specials included)."""
    middle = np.random.default_rng(seed).integers(5, 150, size=length - 2).tolist()
    return [0, *middle, 2]


async def test_a_request_that_would_end_past_its_deadline_is_429_over_http(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    """One pass running and two texts queued: at the pace (seeded here, 1 ms a token plus
    attention: about 0.57 s for a 400-token text) a request of one more text ends within
    75 % of the 2.4 s deadline and is queued; one of two more would end past it: 429 with
    Retry-After, in the client's shape, before any of it runs."""
    passes = HeldPasses()
    settings = settings_for(tiny_model_dir, workers=1, request_timeout_s=2.4)
    async with running_server(settings, load_encoder=loader_with(passes.hold)) as server:
        server.scheduler.seed_pace(
            (b, s, 0.01 + b * s * (0.001 + 1e-6 * s)) for b, s in [(1, 40), (4, 100), (1, 800)] * 4
        )
        passes.engaged.set()
        answers: list[httpx.Response] = []

        async def embed(*texts: list[int]) -> None:
            answers.append(await server.client.post("/v1/embeddings", json={"input": list(texts)}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(embed, _ids(400, 0))
            await trio.to_thread.run_sync(passes.started.wait, 30)  # running, held
            for seed in (1, 2):
                nursery.start_soon(embed, _ids(400, seed))
            with trio.fail_after(30):
                while server.stats().queued_items < 2:  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.01)
            late = await server.client.post(
                "/v1/embeddings", json={"input": [_ids(400, 3), _ids(400, 4)]}
            )
            assert server.stats().queued_items == 2  # refused whole, nothing queued
            passes.release.set()
        assert late.status_code == 429
        assert late.json()["error"]["code"] == "queue_full"
        assert "would finish in about" in late.json()["error"]["message"]
        assert int(late.headers["retry-after"]) >= 1
        assert [r.status_code for r in answers] == [200, 200, 200]


async def test_past_the_queue_s_token_bound_a_request_is_429_over_http(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    """``BGE_TRIO_MAX_QUEUE_TOKENS``: texts that would take the queue past it are refused
    whole; texts that bring it exactly to it are queued."""
    probe = ControllableProbe()  # the gate stays closed: texts wait in the queue
    settings = settings_for(tiny_model_dir, max_queue_tokens=50, startup_wait_s=60)
    async with running_server(settings, ready=False, planner=probe) as server:
        await probe.wait_started()
        answers: list[httpx.Response] = []

        async def embed(*texts: list[int]) -> None:
            answers.append(await server.client.post("/v1/embeddings", json={"input": list(texts)}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(embed, _ids(20, 0), _ids(20, 1))
            with trio.fail_after(30):
                while server.stats().queued_tokens < 40:  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.01)
            over = await server.client.post("/v1/embeddings", json={"input": [_ids(11, 2)]})
            nursery.start_soon(embed, _ids(10, 3))  # 50 tokens: exactly the bound
            with trio.fail_after(30):
                while server.stats().queued_tokens < 50:  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.01)
            probe.release.set()
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "queue_full"
        assert int(over.headers["retry-after"]) >= 1
        assert sorted(r.status_code for r in answers) == [200, 200]
        assert sorted(len(r.json()["data"]) for r in answers) == [1, 2]


@pytest.mark.alone
async def test_the_probe_s_timed_passes_are_the_first_pace(
    tiny_model_dir: Path, settings_for: SettingsFactory
) -> None:
    """With one worker, the pace admission judges the first request by is the probe's
    own timed passes (kept in the probe cache with its cost model): passes recorded
    10,000 times slower than they ran make a long text too slow for the deadline at
    once, before any pass of it runs."""
    settings = settings_for(tiny_model_dir, probe="auto", workers=1, request_timeout_s=5.0)
    async with running_server(settings):
        pass  # probed and cached, with the probe's pass times
    (cached,) = settings.cache_dir.glob("probe-*.json")
    data = json.loads(cached.read_text())
    assert len({(b, s) for b, s, _ in data["pass_seconds"]}) >= 3
    data["pass_seconds"] = [[b, s, t * 1e4] for b, s, t in data["pass_seconds"]]
    cached.write_text(json.dumps(data))
    async with running_server(settings) as server:
        assert server.stats().forwarded_items == 0
        slow = server.scheduler.predict_seconds(1, 400)
        assert slow is not None
        assert slow > 5.0  # the recorded pace, not a measured one
        r = await server.client.post("/v1/embeddings", json={"input": [_ids(400, 0)]})
        assert r.status_code == 413
        error = r.json()["error"]
        assert error["code"] == "input_too_slow_for_deadline"
        assert "would take about" in error["message"]
        assert server.stats().forwarded_items == 0  # refused before it ran
