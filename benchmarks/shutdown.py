"""Shutdown under load: does every accepted request get an answer?

    python -m benchmarks.shutdown [--graceful 30] [--clients 16] [--texts 32]

Plain ``hypercorn --worker-class trio --graceful-timeout G 'bge_trio.asgi:app'``
serving the bundled all-MiniLM-L6-v2; ``--clients`` concurrent requests of
``--texts`` texts of about 310 tokens each (far more work than the window can
finish on a small machine) are all in the server's hands, then SIGTERM goes

* to the hypercorn parent only (docker stop, Kubernetes), and
* to the whole process group (systemd's ``KillMode=control-group``).

For each: how many requests were answered 200, 503 (``shutting_down``, with
``Retry-After``), or not at all; when the answers came after the signal; the exit
status and how long the process took to exit. Writes ``docs/results/shutdown.json`` and its
table into ``docs/operations.md``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.docs import load_result, save_result
from benchmarks.harness import cpu_name
from benchmarks.reports.shutdown import table, write_tables
from bge_trio.cgroups import cpu_count
from bge_trio.testing.processes import HYPERCORN, start

TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away " * 22


def _start(graceful: int, cache: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGE_TRIO_")}
    metrics = tempfile.mkdtemp(prefix="bge-trio-metrics-")
    env.update(
        BGE_TRIO_MODEL="bundled",
        BGE_TRIO_CACHE_DIR=str(cache),
        BGE_TRIO_LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=metrics,
    )
    command = [*HYPERCORN[:-1], "--graceful-timeout", str(graceful), HYPERCORN[-1]]
    served = start(command, env, ready_s=300)
    return served.process, served.url


def _in_flight(url: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "bge_trio_requests_in_flight":
                total += sample.value
    return total


def scenario(how: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    process, url = _start(args.graceful, cache)
    answers: list[dict[str, Any]] = []
    body = {"input": [TEXT] * args.texts}

    def client() -> None:
        try:
            r = httpx.post(url + "/v1/embeddings", json=body, timeout=600)
            answers.append(
                {
                    "status": r.status_code,
                    "code": r.json().get("error", {}).get("code") if r.status_code != 200 else None,
                    "retry_after": r.headers.get("retry-after"),
                    "at": time.monotonic(),
                }
            )
        except httpx.TransportError as exc:
            answers.append({"status": None, "code": type(exc).__name__, "at": time.monotonic()})

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    while _in_flight(url) + len(answers) < args.clients:
        time.sleep(0.05)
    signalled = time.monotonic()
    if how == "parent":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    for thread in threads:
        thread.join()
    code = process.wait(timeout=args.graceful + 60)
    exited = time.monotonic() - signalled
    for answer in answers:
        answer["after_signal_s"] = round(answer.pop("at") - signalled, 2)
    statuses = [a["status"] for a in answers]
    return {
        "signal_to": how,
        "requests": len(answers),
        "answered_200": statuses.count(200),
        "answered_503": statuses.count(503),
        "dropped": statuses.count(None),
        "other": sum(1 for s in statuses if s not in (200, 503, None)),
        "exit_status": code,
        "exit_after_s": round(exited, 2),
        "answers": sorted(answers, key=lambda a: a["after_signal_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graceful", type=int, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite the tables from shutdown.json"
    )
    args = parser.parse_args()
    if args.tables_only:
        write_tables(load_result("shutdown"))
        return
    cache = Path(tempfile.mkdtemp(prefix="bge-trio-probe-"))
    runs = [scenario(how, args, cache) for how in ("parent", "group")]
    result = {
        "setup": {
            "model": "all-MiniLM-L6-v2 (bundled)",
            "server": "hypercorn --worker-class trio (one worker)",
            "graceful_timeout_s": args.graceful,
            "clients": args.clients,
            "texts": args.texts,
            "cpus": cpu_count(),
            "machine": cpu_name(),
        },
        "runs": runs,
    }
    save_result("shutdown", result)
    write_tables(result)
    print(table(result))


if __name__ == "__main__":
    main()
