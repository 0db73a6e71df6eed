"""Online recalibration: served passes above their prediction correct the cost model."""

from __future__ import annotations

import json
import shlex
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bge_trio.memory.probe import resident_bytes
from bge_trio.memory.recalibrate import Recalibrator
from bge_trio.model.source import ModelSource
from bge_trio.testing.processes import bge_trio, env_for, serving
from tests.conftest import SettingsFactory, running_server


def test_a_pass_above_its_prediction_raises_the_correction_by_its_ratio() -> None:
    r = Recalibrator(tolerance=0.02, confirm=2)
    assert r.observe(4, 256, measured=300, predicted=100) is not None
    assert r.correction == pytest.approx(3.0)
    drift = r.statistics()
    assert (drift.passes_measured, drift.passes_over, drift.confirmed) == (1, 1, False)
    assert drift.last_overrun is not None
    assert (drift.last_overrun.batch, drift.last_overrun.seq) == (4, 256)
    # the next prediction is already corrected: 1.5x above it compounds to 4.5
    assert r.observe(8, 256, measured=450, predicted=300) is not None
    assert r.correction == pytest.approx(4.5)
    assert r.statistics().confirmed


def test_passes_within_tolerance_or_below_never_change_the_model() -> None:
    r = Recalibrator(tolerance=0.02)
    assert r.observe(1, 10, measured=101, predicted=100) is None
    assert r.observe(1, 10, measured=50, predicted=100) is None
    drift = r.statistics()
    assert drift.correction == 1.0
    assert drift.passes_over == 0
    assert drift.passes_measured == 2
    assert drift.worst_ratio == pytest.approx(1.01)


def test_the_correction_never_goes_down() -> None:
    r = Recalibrator()
    r.observe(1, 10, measured=200, predicted=100)
    r.observe(1, 10, measured=10, predicted=200)
    assert r.correction == pytest.approx(2.0)


def test_statistics_is_a_frozen_snapshot() -> None:
    r = Recalibrator()
    before = r.statistics()
    r.observe(1, 10, measured=200, predicted=100)
    assert before.correction == 1.0
    report = r.statistics().report()
    assert report["correction"] == 2.0
    assert report["last_overrun"] == {
        "batch": 1,
        "seq": 10,
        "measured_bytes": 200,
        "predicted_bytes": 100,
    }


# -- a real server in a real memory cgroup ---------------------------------------------


def _cache_file(cache_dir: Path) -> Path:
    (path,) = cache_dir.glob("probe-*.json")
    return path


@pytest.mark.slow
def test_a_server_with_a_cached_model_too_small_corrects_itself_before_any_oom_kill(
    memory_cgroup: Path, tmp_path: Path
) -> None:
    env = env_for(
        tmp_path,
        dtype="fp32",  # sizes below are fp32's
        BGE_TRIO_PROBE="auto",
        BGE_TRIO_MEMORY_HEADROOM_BYTES=str(128 << 20),
        BGE_TRIO_MAX_BATCH_TOKENS=str(1 << 20),
        BGE_TRIO_MAX_QUEUE_ITEMS="4096",
        BGE_TRIO_REQUEST_TIMEOUT_S="900",
    )
    server = [*bge_trio(), "serve", "--model", "bundled", "--port", "0"]
    # 1. a real probe fills the cache; 2. the cached model is cut to a quarter
    with serving(server, env):
        pass
    cached = _cache_file(tmp_path / "cache")
    data = json.loads(cached.read_text())
    true_a = data["a"]
    for term in ("a", "b", "c"):
        data[term] /= 4
    cached.write_text(json.dumps(data))

    # 3. inside the memory limit, with that model: a quarter of the truth would plan
    # batches four times the workspace, far past the limit
    command = f"echo $$ > {memory_cgroup / 'cgroup.procs'}; exec {shlex.join(server)}"
    rng = np.random.default_rng(0)
    with serving(["sh", "-c", command], env) as served:
        url = served.url
        health = httpx.get(url + "/health").json()
        assert health["probe_status"] == "cache_hit"
        assert health["cost_a_bytes_per_token"] == pytest.approx(true_a / 4)
        workspace = health["per_forward_budget_bytes"]
        # a first pass of about a fifth of the true workspace: measured, found 4x over
        first = rng.integers(1000, 30000, size=(12, 256)).tolist()
        r = httpx.post(url + "/v1/embeddings", json={"input": first}, timeout=120)
        assert r.status_code == 200
        drift = httpx.get(url + "/info").json()["memory"]["drift"]
        assert drift["passes_over_prediction"] >= 1
        assert drift["correction"] > 2.0
        assert 1 <= drift["last_overrun"]["batch"] <= 12
        assert (
            drift["last_overrun"]["measured_bytes"] > 2 * drift["last_overrun"]["predicted_bytes"]
        )
        # from here on passes are planned with the corrected model: no more texts of 256
        # tokens than fit the workspace at its cost (an upper bound: the per-pass constant
        # and the express lane's share only lower it); the cut model would plan several
        # times as many
        per_text = drift["correction"] * (data["a"] * 256 + data["b"] * 256**2)
        fits = workspace / per_text
        # then a burst whose batches the uncorrected model would make ~4x the workspace
        # (288 texts of 256 tokens queued at once: batches of up to 256, the largest allowed)
        statuses: list[int] = []

        def client(seed: int) -> None:
            texts = np.random.default_rng(seed).integers(1000, 30000, size=(72, 500)).tolist()
            with httpx.Client(base_url=url, timeout=600) as http:
                r = http.post("/v1/embeddings", json={"input": texts})
                statuses.append(r.status_code)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert served.process.poll() is None, "the server died:\n" + "".join(served.stderr[-20:])
        assert statuses == [200] * 4
        largest = _largest_batch_bound(httpx.get(url + "/metrics").text)
        assert largest <= 2 * fits, (largest, fits)
        info = httpx.get(url + "/info").json()["memory"]
        assert info["drift"]["confirmed"] or info["drift"]["passes_over_prediction"] == 1
        assert any("above the" in line for line in served.stderr)
    oom = dict(
        line.split() for line in (memory_cgroup / "memory.oom_control").read_text().splitlines()
    )
    assert oom.get("oom_kill", "0") == "0"
    assert workspace > 0
    # the corrected model was kept once confirmed, or stays as probed
    kept = json.loads(cached.read_text())
    if info["drift"]["confirmed"]:
        assert kept["method"] == "recalibrated"
        assert kept["a"] > true_a / 4 * 3


@pytest.mark.slow
def test_a_bf16_server_measures_its_passes_and_corrects_a_cost_model_too_small(
    tmp_path: Path,
) -> None:
    """bf16 serving (emulated where the CPU has no native bf16) measures its passes like
    fp32 does: given a cost model a hundred times too small, the first large pass peaks
    far above its prediction and the model is corrected."""
    env = env_for(
        tmp_path,
        dtype="bf16",
        BGE_TRIO_COST_A="100",  # bytes per token: bf16 MiniLM needs about 8,500
        BGE_TRIO_COST_B="0",
        BGE_TRIO_MEMORY_LIMIT_BYTES=str(1536 << 20),
        BGE_TRIO_MAX_BATCH_TOKENS="16384",  # one pass of all 32 texts: over 5 % of the workspace
    )
    command = [*bge_trio(), "serve", "--model", "bundled", "--port", "0"]
    with serving(command, env) as served:
        assert httpx.get(served.url + "/info").json()["dtype"] == "bf16"
        ids = np.random.default_rng(0).integers(1000, 30000, size=(32, 250)).tolist()
        r = httpx.post(served.url + "/v1/embeddings", json={"input": ids}, timeout=300)
        assert r.status_code == 200
        memory = httpx.get(served.url + "/info").json()["memory"]
    drift = memory["drift"]
    assert drift["passes_over_prediction"] >= 1, json.dumps(memory)
    assert drift["correction"] > 10
    overrun = drift["last_overrun"]
    assert overrun["measured_bytes"] > 10 * overrun["predicted_bytes"]


def _tokens(texts: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids: list[list[int]] = rng.integers(1000, 30000, size=(texts, length)).tolist()
    return ids


def _largest_batch_bound(text: str) -> float:
    """The smallest bucket bound of ``bge_trio_batch_size`` (texts per pass, powers of two)
    that every pass so far is under: less than twice the largest pass."""
    counts = {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bge_trio_batch_size_bucket"
    }
    return min(bound for bound, count in counts.items() if count == counts[float("inf")])


def _correction_gauge(text: str, model: str) -> float:
    (value,) = (
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bge_trio_cost_correction" and sample.labels["model"] == model
    )
    return value


async def test_a_confirmed_correction_is_kept_and_the_next_start_begins_corrected(
    bundled_source: ModelSource, settings_for: SettingsFactory, tmp_path: Path
) -> None:
    """Outside any cgroup, in one process: a probed model cached, then cut so that only its
    per-pass constant is left; served passes below 5 % of the workspace are not measured,
    larger ones are, and the second that peaks above its prediction confirms the
    correction (the gauge says it); it is kept in the probe cache, and the next start
    plans with the corrected model from its first pass."""
    settings = settings_for(
        bundled_source.path,
        probe="auto",
        # 1.5 GiB above what this test process already holds (other tests' models too)
        memory_limit_bytes=resident_bytes() + (3 << 29),
        workers=1,  # every pass runs alone, so every one is measured
        express_tokens=0,  # no express lane: every pass is a regular one
        max_batch_tokens=1 << 20,  # each request one pass
    )
    async with running_server(settings):
        pass  # probed, and cached
    cached = _cache_file(settings.cache_dir)
    data = json.loads(cached.read_text())
    data["a"], data["b"] = data["a"] / 1e4, data["b"] / 1e4  # c alone: far too small
    cached.write_text(json.dumps(data))

    async with running_server(settings) as server:
        assert (await server.client.get("/health")).json()["probe_status"] == "cache_hit"
        workspace = server.scheduler.given_policy.workspace_bytes
        tiny = await server.client.post("/v1/embeddings", json={"input": _tokens(1, 8, 0)})
        assert tiny.status_code == 200
        # measured, but under 5 % of the workspace: not counted against the cost model
        tiny_pass = server.stats().last_measured
        assert tiny_pass is not None
        assert tiny_pass.bytes < 0.05 * workspace
        drift = (await server.client.get("/info")).json()["memory"]["drift"]
        assert drift["passes_measured"] == 0
        for texts, seed in ((16, 1), (64, 2)):  # about 4,000 tokens, then four times as many
            r = await server.client.post(
                "/v1/embeddings", json={"input": _tokens(texts, 250, seed)}
            )
            assert r.status_code == 200
        drift = (await server.client.get("/info")).json()["memory"]["drift"]
        assert drift["passes_measured"] == 2
        assert drift["passes_over_prediction"] == 2
        assert drift["confirmed"]
        correction = drift["correction"]
        assert correction > 10
        metrics = (await server.client.get("/metrics")).text
        gauge = _correction_gauge(metrics, server.engine.statistics().name)
        assert gauge == pytest.approx(correction, rel=1e-3)
        with trio.fail_after(30):  # the engine writes the confirmed model off the event loop
            while json.loads(cached.read_text())["method"] != "recalibrated":  # noqa: ASYNC110
                await trio.sleep(0.01)
    kept = json.loads(cached.read_text())
    assert kept["c"] == pytest.approx(data["c"] * correction, rel=1e-3)

    async with running_server(settings) as server:
        health = (await server.client.get("/health")).json()
        assert health["probe_status"] == "cache_hit"
        assert health["cost_c_bytes_per_pass"] == pytest.approx(kept["c"], rel=1e-6)
        assert health["cost_a_bytes_per_token"] == pytest.approx(kept["a"], rel=1e-6)
