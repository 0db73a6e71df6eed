"""The console script and the plain-hypercorn entry point, as real processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from bge_trio.memory.allocator import HUGE_PAGES, huge_pages_on_request, start_tunables
from bge_trio.testing.processes import HYPERCORN, bge_trio, env_for, serving
from tests.command import RunHere
from tests.reference import ReferenceM3, assert_dense_answer

pytestmark = pytest.mark.slow  # the command line, run as processes


def test_console_script_is_installed() -> None:
    out = subprocess.run(["bge-trio", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("bge-trio ")


def test_plain_hypercorn_entry_point_reports_bad_settings(tmp_path: Path) -> None:
    out = subprocess.run(
        HYPERCORN,
        env=env_for(tmp_path, dtype="bf16", BGE_TRIO_WORKERS="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # hypercorn's parent process reports a worker's failure as exit 0, so only the
    # message can be checked here; `bge-trio serve` exits 2 (tested above).
    assert "bge-trio: BGE_TRIO_WORKERS='lots': expected an integer in [1, 64]" in out.stderr
    assert "Traceback" not in out.stderr


def test_plain_hypercorn_serves(
    tiny_model_dir: Path, tmp_path: Path, reference: ReferenceM3
) -> None:
    with serving(
        HYPERCORN, env_for(tmp_path, dtype="fp32", BGE_TRIO_MODEL=str(tiny_model_dir))
    ) as server:
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "hello"})
        assert_dense_answer(r, reference, ["hello"])
        r = httpx.post(server.url + "/v1/sparse-embeddings", json={"input": "hello"})
        assert r.status_code == 200
        (item,) = r.json()["data"]
        (expected,) = reference.encode(["hello"])
        assert item["sparse_values"]["indices"] == sorted(expected.sparse)


def test_memory_too_small_exits_3_with_the_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [*bge_trio(), "serve", "--model", str(tiny_model_dir), "--port", "0"],
        env=env_for(
            tmp_path,
            dtype="bf16",
            BGE_TRIO_MEMORY_LIMIT_BYTES=str(1 << 20),
            BGE_TRIO_MEMORY_HEADROOM_BYTES="0",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 3
    assert "too small" in out.stderr
    assert "BGE_TRIO_MAX_SEQ_LENGTH <=" in out.stderr


def test_serve_finishes_in_flight_requests_on_sigterm_and_exits_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a window and a deadline every request fits in on a slow CPU too: what is tested is
    # that accepted work is finished, not which work admission or the window keeps
    # (tests/test_admission.py, tests/test_shutdown.py)
    command = [*bge_trio(), "serve", "--model", str(tiny_model_dir), "--port", "0"]
    command += ["--graceful-timeout", "240"]
    results: list[tuple[int, float]] = []
    text = "the quick brown fox jumps over the lazy dog " * 50
    env = env_for(
        tmp_path, dtype="fp32", BGE_TRIO_BATCH_WAIT_MS="0", BGE_TRIO_REQUEST_TIMEOUT_S="600"
    )
    with serving(command, env) as server:

        def client() -> None:
            body = {"input": [text] * 48}
            r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)
            results.append((r.status_code, time.monotonic()))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        # until every request is in the server's hands (one that arrives after the signal is
        # new work, refused) and texts wait in its queue for a pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = httpx.get(server.url + "/health").json()
            arrived = health.get("requests_in_flight", 0) + len(results) >= 8
            if arrived and health.get("queued_items", 0) > 0:
                break
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert server.process.wait(timeout=60) == 0
        log = "".join(server.stderr)
    assert [status for status, _ in results] == [200] * 8
    # texts were queued when the signal came, and the drain ran them (an immediate 503
    # would have answered them): none was refused
    assert health["queued_items"] > 0
    assert max(done for _, done in results) > signalled
    drained = re.search(r"of (\d+) in flight, (\d+) could not finish", log)
    assert drained is not None, log
    assert int(drained.group(1)) >= 1, drained.group(0)
    assert drained.group(2) == "0", drained.group(0)


@pytest.mark.parametrize("own", [None, "glibc.malloc.arena_max=2"])
def test_serve_starts_on_huge_pages_where_the_kernel_gives_them(
    own: str | None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The serving process (the same process id, started again) has glibc's huge-page
    tunable where the kernel allows huge pages on request; tunables of one's own are kept."""
    command = [*bge_trio(), "serve", "--model", str(tiny_model_dir), "--port", "0"]
    env = env_for(tmp_path, dtype="fp32")
    if own is not None:
        env["GLIBC_TUNABLES"] = own
    with serving(command, env) as server:
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
        assert httpx.post(server.url + "/v1/embeddings", json={"input": "a"}).status_code == 200
    tunables = [e.decode() for e in environ if e.startswith(b"GLIBC_TUNABLES=")]
    if own is not None:
        assert tunables == [f"GLIBC_TUNABLES={own}"]
    elif huge_pages_on_request():
        assert tunables == [f"GLIBC_TUNABLES={HUGE_PAGES}"]
    else:
        assert tunables == []


@pytest.mark.heavy
def test_metrics_add_up_across_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A scrape of either process counts the requests both served (each process's own
    count is read from its file, so the test knows both served some)."""
    command = [*bge_trio(), "serve", "--model", str(tiny_model_dir), "--port", "0"]
    prom = tmp_path / "prom"
    prom.mkdir()
    env = env_for(tmp_path, dtype="bf16", PROMETHEUS_MULTIPROC_DIR=str(prom))
    with (
        serving([*command, "--processes", "2"], env) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for _ in range(2):
            assert _wait_all_healthy(client)
        sent = 0
        # new connections, until both processes have served some (the kernel picks)
        while sent < 20 or not _both_served(_served_per_process(prom, tmp_path)):
            with httpx.Client(base_url=server.url) as fresh:
                assert fresh.post("/v1/embeddings", json={"input": "x"}).status_code == 200
            sent += 1
            assert sent < 400, "one process never served a request"
        text = client.get("/metrics").text
    per_process = _served_per_process(prom, tmp_path)
    assert _both_served(per_process), per_process
    assert sum(per_process) == sent
    assert _embeddings_served(text) == sent


def _embeddings_served(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bge_trio_requests_total" and sample.labels == {
                "route": "/v1/embeddings",
                "status": "200",
            }:
                total += sample.value
    return total


def _served_per_process(prom: Path, tmp_path: Path) -> list[float]:
    """Each process's own count of /v1/embeddings 200s, from its own counter file."""
    import shutil

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    counts = []
    for index, counter in enumerate(sorted(prom.glob("counter_*.db"))):
        alone = tmp_path / f"alone-{index}"
        shutil.rmtree(alone, ignore_errors=True)
        alone.mkdir()
        shutil.copy(counter, alone)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        counts.append(_embeddings_served(generate_latest(registry).decode()))
    return counts


def _both_served(per_process: list[float]) -> bool:
    return len([count for count in per_process if count > 0]) == 2


def _wait_all_healthy(client: httpx.Client) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return True
        time.sleep(0.1)
    return False


def test_probe_serve_and_embed_run_one_startup_and_plan_alike(
    tmp_path: Path, bge_trio_here: RunHere
) -> None:
    """``bge-trio probe`` writes the probe cache; a server and ``bge-trio embed`` with the
    same settings run the same startup sequence, find that entry and plan with the cost
    model the probe printed. The probe and the job run in this process, the server as a
    process of its own."""
    env = env_for(tmp_path, dtype="fp32", BGE_TRIO_PROBE="auto", BGE_TRIO_MAX_SEQ_LENGTH="128")
    # the server starts with this process's glibc tunables (the probe cache keys on them;
    # a program would start itself again on huge pages, as `bge-trio probe` run as one does)
    env["GLIBC_TUNABLES"] = start_tunables()
    probed = bge_trio_here(["probe", "--model", "bundled"], env)
    assert probed.code == 0, probed.stderr
    fit = re.search(
        r"fit: a = ([\d.]+) bytes/token, b = ([\d.]+) bytes/token\^2, c = (\d+) bytes/pass",
        probed.stdout,
    )
    assert fit is not None, probed.stdout
    printed = [float(value) for value in fit.groups()]
    command = [*bge_trio(), "serve", "--model", "bundled", "--port", "0"]
    with serving(command, env) as server:
        health = httpx.get(server.url + "/health").json()
    served = [
        health[f"cost_{t}"] for t in ("a_bytes_per_token", "b_bytes_per_token2", "c_bytes_per_pass")
    ]
    assert health["probe_status"] == "cache_hit"
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"id": 1, "text": "a cat"}\n')
    embedded = bge_trio_here(
        ["embed", str(corpus), str(tmp_path / "out"), "--model", "bundled"], env
    )
    assert embedded.code == 0, embedded.stderr
    memory = json.loads((tmp_path / "out" / "_manifest.json").read_text())["memory"]
    assert memory["probe_status"] == "cache_hit"
    planned = [
        memory[f"cost_{t}"] for t in ("a_bytes_per_token", "b_bytes_per_token2", "c_bytes_per_pass")
    ]
    assert planned == served
    assert served == pytest.approx(printed, abs=0.5)  # as printed: to 0.1, 0.001 and 1
