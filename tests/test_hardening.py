"""Overload, deadlines, disconnects, faults, the API key, request ids, metrics and OpenAPI."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bge_trio.scheduler.batching import BatchPolicy
from tests.conftest import Server, running_server, wait_ready
from tests.encoders import loader_with
from tests.reference import ReferenceM3, assert_dense_answer
from tests.test_gate import ControllableProbe

MARKER = 77  # a token id the faulty model refuses


async def test_overload_is_429_with_retry_after_and_no_5xx(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    probe = ControllableProbe()
    settings = settings_for(tiny_model_dir, max_queue_items=8, startup_wait_s=60)
    async with running_server(settings, ready=False, planner=probe) as server:
        await probe.wait_started()
        statuses: list[int] = []
        retry_after: list[str] = []

        async def client(texts: list[str]) -> None:
            r = await server.client.post("/v1/embeddings", json={"input": texts})
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after.append(r.headers["retry-after"])
                assert r.json()["error"]["code"] == "queue_full"

        async with trio.open_nursery() as nursery:
            for _ in range(2):  # 8 texts: the queue is full
                nursery.start_soon(client, ["four texts"] * 4)
            with trio.fail_after(30):
                while server.stats().queued_items < 8:  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.01)
            await client(["one more text"])  # a single text is refused like a batch
            await client(["a"] * 3)
            probe.release.set()
        assert sorted(statuses) == [200, 200, 429, 429]
        assert all(value.isdigit() for value in retry_after)
        await wait_ready(server.client)
        # an idle server admits even a request larger than the queue bound
        r = await server.client.post("/v1/embeddings", json={"input": ["x"] * 20})
        assert r.status_code == 200


async def test_flood_sheds_load_without_errors(tiny_model_dir: Path, settings_for: Any) -> None:
    settings = settings_for(tiny_model_dir, max_queue_items=16)
    async with running_server(settings) as server:
        answers: list[httpx.Response] = []
        texts = [
            f"text {i}: " + "the quick brown fox jumps over the lazy dog " * 10 for i in range(8)
        ]
        expected = []  # each text's vector, asked alone before the flood
        for text in texts:
            alone = await server.client.post("/v1/embeddings", json={"input": text})
            expected.append(alone.json()["data"][0]["embedding"])

        async def client() -> None:
            for _ in range(4):
                answers.append(await server.client.post("/v1/embeddings", json={"input": texts}))

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(client)
        statuses = [r.status_code for r in answers]
        assert len(statuses) == 64
        assert set(statuses) <= {200, 429}
        assert 200 in statuses
        assert 429 in statuses
        for r in answers:
            if r.status_code == 200:  # answered in full: every text's own vector, in order
                data = r.json()["data"]
                assert [item["index"] for item in data] == list(range(8))
                got = [item["embedding"] for item in data]
                np.testing.assert_allclose(got, expected, atol=1e-5)
            else:  # refused whole, in the client's shape, with when to come back
                assert r.json()["error"]["code"] == "queue_full"
                assert int(r.headers["retry-after"]) >= 1
        assert (await server.client.get("/health")).status_code == 200
        assert server.stats().queued_items == 0


async def test_deadline_passes_and_texts_never_reach_the_model(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    probe = ControllableProbe()
    settings = settings_for(tiny_model_dir, request_timeout_s=0.3, startup_wait_s=60)
    async with running_server(settings, ready=False, planner=probe) as server:
        await probe.wait_started()
        r = await server.client.post("/v1/embeddings", json={"input": ["late"] * 3})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "request_timeout"
        probe.release.set()
        await wait_ready(server.client)
        r = await server.client.post("/v1/embeddings", json={"input": "marker"})
        assert r.status_code == 200
        assert server.stats().forwarded_items == 1


async def test_disconnected_client_texts_are_dropped(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    probe = ControllableProbe()
    settings = settings_for(tiny_model_dir, startup_wait_s=60)
    async with running_server(settings, ready=False, planner=probe) as server:
        await probe.wait_started()
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as impatient:
            with pytest.raises(httpx.TimeoutException):
                await impatient.post("/v1/embeddings", json={"input": ["gone"] * 5})
        with trio.fail_after(10):  # until the server has noticed the closed connection
            while True:
                if server.engine.statistics().requests_in_flight == 0:
                    break
                await trio.sleep(0.01)
        probe.release.set()
        await wait_ready(server.client)
        r = await server.client.post("/v1/embeddings", json={"input": "marker"})
        assert r.status_code == 200
        assert server.stats().forwarded_items == 1


def _explode_on_marker(batch: Sequence[Sequence[int]]) -> None:
    """The real tiny model, except that its forward pass raises on a marked token."""
    if any(MARKER in ids for ids in batch):
        raise RuntimeError("/secret/path tensor of shape (3, 7) exploded")


load_faulty = loader_with(_explode_on_marker)


async def test_faults_fail_their_batch_flip_health_and_recover(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    settings = settings_for(tiny_model_dir, failure_threshold=2)
    async with running_server(settings, load_encoder=load_faulty) as server:
        client = server.client
        bad = {"input": [[0, MARKER, 2]]}
        r = await client.post("/v1/embeddings", json=bad)
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert "secret" not in r.text
        assert (await client.get("/health")).status_code == 200  # one failure: still healthy
        assert (await client.post("/v1/embeddings", json=bad)).status_code == 500
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        fine = await client.post("/v1/embeddings", json={"input": "fine"})
        assert_dense_answer(fine, reference, ["fine"])
        assert (await client.get("/health")).status_code == 200


class ExplodingPolicy(BatchPolicy):
    """A batch policy that breaks the scheduler itself."""

    def fits(self, batch: int, seq: int) -> bool:
        raise RuntimeError("planner bug")


async def test_a_crashed_scheduler_answers_and_reports(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    async with running_server(settings_for(tiny_model_dir)) as server:
        given = server.scheduler.given_policy
        server.scheduler.set_policy(ExplodingPolicy(given.cost, given.workspace_bytes))
        r = await server.client.post("/v1/embeddings", json={"input": ["a", "b"]})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "server_failed"
        assert server.engine.failed.is_set()
        health = await server.client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"


# A server in a process of its own, as in production (create_app exits the process when
# an engine fails for good), whose scheduler the first request crashes.
_CRASHING_SERVER = """
import sys
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from bge_trio.app import create_app
from bge_trio.config import Settings
from bge_trio.scheduler.batching import BatchPolicy


class ExplodingPolicy(BatchPolicy):
    def fits(self, batch, seq):
        raise RuntimeError("planner bug")


async def main():
    settings = Settings(model=sys.argv[1], cache_dir=Path(sys.argv[2]), probe="off", dtype="fp32")
    app = create_app(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        url = (await nursery.start(serve, app, config))[0]
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while (await client.get("/health")).status_code != 200:
                await trio.sleep(0.05)
            scheduler = app.extensions["bge_trio"].default.scheduler
            given = scheduler.given_policy
            scheduler.set_policy(ExplodingPolicy(given.cost, given.workspace_bytes))
            r = await client.post("/v1/embeddings", json={"input": ["a", "b"]})
            print(r.status_code, r.json()["error"]["code"], flush=True)
            await trio.sleep_forever()  # until the app ends the process


trio.run(main)
"""


@pytest.mark.slow  # a process that must end
def test_a_crashed_scheduler_ends_the_process_with_exit_3(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The orchestrator restarts what exits: the queued request is answered 503, then the
    process exits 3 (docs/operations.md)."""
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_SERVER, str(tiny_model_dir), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == ["503", "server_failed"]
    assert "planner bug" in done.stderr  # the error is logged


async def test_api_key(tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3) -> None:
    async with running_server(settings_for(tiny_model_dir, api_key="s3cret")) as server:
        client = server.client
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = await client.post("/v1/embeddings", json={"input": "a"}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        ok = await client.post(
            "/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert_dense_answer(ok, reference, ["a"])
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/live")).status_code == 200
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401


async def test_request_id_is_echoed_or_made(tiny_server: Server) -> None:
    r = await tiny_server.client.post(
        "/v1/embeddings", json={"input": "a"}, headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    r = await tiny_server.client.post("/v1/embeddings", json={"input": "a"})
    assert len(r.headers["x-request-id"]) == 32
    r = await tiny_server.client.get("/nowhere")
    assert r.headers["x-request-id"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_parse_and_move(tiny_server: Server) -> None:
    client = tiny_server.client
    key = ("bge_trio_requests_total", (("route", "/v1/embeddings"), ("status", "200")))
    before = _samples((await client.get("/metrics")).text)
    for _ in range(3):
        await client.post("/v1/embeddings", json={"input": ["a", "bb"]})
    await client.post("/v1/embeddings", json={"input": []})
    after = _samples((await client.get("/metrics")).text)
    assert after[key] - before.get(key, 0.0) == 3
    bad = ("bge_trio_requests_total", (("route", "/v1/embeddings"), ("status", "400")))
    assert after[bad] - before.get(bad, 0.0) == 1
    # what belongs to the served model carries its name
    model = (("model", tiny_server.engine.name),)
    batches = ("bge_trio_batch_size_count", model)
    assert after[batches] > before.get(batches, 0)
    assert after[("bge_trio_cost_a_bytes_per_token", model)] == 16384.0
    assert after[("bge_trio_probe_status", (*model, ("status", "disabled")))] == 1.0
    assert after[("bge_trio_process_resident_bytes", ())] > 0
    assert ("bge_trio_queued_items", model) in after


async def test_openapi_document_matches_the_routes(tiny_server: Server) -> None:
    doc = (await tiny_server.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    app_routes = {
        rule.rule: rule.methods - {"HEAD", "OPTIONS"}
        for rule in tiny_server.service_app.url_map.iter_rules()
        if rule.endpoint != "static"
    }
    assert set(doc["paths"]) == set(app_routes)
    for path, methods in app_routes.items():  # every method served is documented
        assert {m.lower() for m in methods} == set(doc["paths"][path]), path


async def test_input_chars_limit(tiny_model_dir: Path, settings_for: Any) -> None:
    async with running_server(settings_for(tiny_model_dir, max_input_chars=50)) as server:
        r = await server.client.post("/v1/embeddings", json={"input": ["ok", "x" * 51]})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "input_too_long"
        assert "input[1]" in r.json()["error"]["message"]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    [
        "input",
        "encoding_format",
        "dimensions",
        "model",
        "queries",
        "documents",
        "weights",
        "top_n",
        "inputs",
        "ids",
        "return_tokens",
        "add_special_tokens",
        "skip_special_tokens",
    ]
)
ROUTES = [
    "/v1/embeddings",
    "/v1/sparse-embeddings",
    "/v1/embeddings:both",
    "/v1/colbert-embeddings",
    "/v1/score",
    "/tokenize",
    "/decode",
]


async def test_fuzzed_bodies_never_5xx(tiny_model_dir: Path, settings_for: Any) -> None:
    async with running_server(settings_for(tiny_model_dir)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:

            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                route=st.sampled_from(ROUTES),
                body=st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=4)),
            )
            def every_body_gets_an_answer_in_the_openai_shape(route: str, body: Any) -> None:
                r = http.post(route, json=body)
                assert r.status_code < 500, (route, body, r.text)
                assert r.headers["content-type"] == "application/json"
                if r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

            # hypothesis drives the requests, so a failure shrinks to its smallest body; on a
            # thread, because the server runs on this trio loop
            await trio.to_thread.run_sync(every_body_gets_an_answer_in_the_openai_shape)
        assert (await server.client.get("/health")).status_code == 200


async def test_body_over_the_limit_is_413_json(
    tiny_model_dir: Path, settings_for: Any, reference: ReferenceM3
) -> None:
    async with running_server(settings_for(tiny_model_dir, max_body_bytes=4096)) as server:
        r = await server.client.post("/v1/embeddings", json={"input": ["x" * 5000]})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        ok = await server.client.post("/v1/embeddings", json={"input": "ok"})
        assert_dense_answer(ok, reference, ["ok"])


async def test_request_log_line_says_where_time_went(
    tiny_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    access = logging.getLogger("bge_trio.access")
    access.addHandler(caplog.handler)
    try:
        r = await tiny_server.client.post(
            "/v1/embeddings", json={"input": ["a", "b"]}, headers={"x-request-id": "log-me"}
        )
        assert r.status_code == 200
    finally:
        access.removeHandler(caplog.handler)
    records = [rec for rec in caplog.records if getattr(rec, "request_id", "") == "log-me"]
    assert records
    record = records[-1]
    assert record.route == "/v1/embeddings"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.inputs == 2  # type: ignore[attr-defined]
    assert record.tokens > 2  # type: ignore[attr-defined]
    assert record.inference_ms > 0  # type: ignore[attr-defined]
    assert record.queue_ms >= 0  # type: ignore[attr-defined]


async def test_all_torch_work_runs_on_the_forward_thread(
    tiny_model_dir: Path, settings_for: Any
) -> None:
    """One OpenMP team per worker: loading, probing and serving share the forward thread."""
    threads: list[str] = []

    def record(*_: object) -> None:
        threads.append(threading.current_thread().name)

    load = loader_with(record, on_load=record)
    settings = settings_for(tiny_model_dir, probe="auto")
    async with running_server(settings, load_encoder=load) as server:
        r = await server.client.post("/v1/embeddings", json={"input": "hello"})
        assert r.status_code == 200
        info = (await server.client.get("/info")).json()
    assert info["memory"]["probe_status"] in {"complete", "cache_hit"}
    assert info["speed"]["passes_observed"] >= 1
    assert len(threads) >= 3  # load, probe passes, readiness check, the request
    assert set(threads) == {"bge-trio-forward-0"}


async def test_a_connection_survives_a_request_refused_before_its_body_was_read(
    tiny_server: Server, reference: ReferenceM3
) -> None:
    """A body nobody read (no route, wrong method, a GET with a body): the connection is
    closed rather than left to hang, so every next request on the same client is answered."""
    client = tiny_server.client
    body = {"input": "x" * 2000}
    unread = [("PUT", "/v1/embeddings"), ("POST", "/v1/nowhere"), ("GET", "/health")]
    for _ in range(20):
        with trio.fail_after(10):
            for method, path in unread:
                answered = await client.request(method, path, json=body)
                assert answered.status_code in (200, 404, 405)
                assert answered.headers["Connection"] == "close"
                ok = await client.post("/v1/embeddings", json={"input": "after"})
                assert_dense_answer(ok, reference, ["after"])


async def test_openapi_document_states_this_servers_limits_and_the_server_keeps_them(
    tiny_server: Server,
) -> None:
    doc = (await tiny_server.client.get("/openapi.json")).json()
    info = tiny_server.info
    settings = tiny_server.engine.settings
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    fields = embeddings["requestBody"]["content"]["application/json"]["schema"]["properties"]
    dims = fields["dimensions"]["anyOf"][0]
    assert dims["maximum"] == info.dimension
    text, texts, ids, id_lists = fields["input"]["anyOf"]
    assert text["maxLength"] == settings.max_input_chars
    assert texts["maxItems"] == ids["maxItems"] == id_lists["maxItems"] == settings.max_batch
    assert ids["items"]["maximum"] == id_lists["items"]["items"]["maximum"] == info.vocab_size - 1
    for code in ("429", "503"):
        assert "Retry-After" in embeddings["responses"][code]["headers"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]

    async def status(body: dict[str, Any]) -> int:
        return (await tiny_server.client.post("/v1/embeddings", json=body)).status_code

    # the boundaries the document states are the ones the server enforces
    assert await status({"input": "x", "dimensions": info.dimension}) == 200
    assert await status({"input": "x", "dimensions": info.dimension + 1}) == 400
    assert await status({"input": "x", "dimensions": None, "model": None}) == 200
    assert await status({"input": [0, info.vocab_size - 1]}) == 200
    assert await status({"input": [0, info.vocab_size]}) == 400
    assert await status({"input": [5.0, 6.0]}) == 200  # JSON Schema's integers include 5.0
    assert await status({"input": [5.5]}) == 400
