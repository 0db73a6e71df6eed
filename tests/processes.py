"""Servers as real processes: started from their command line, stopped by signal."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx


def env_for(tmp_path: Path, *, dtype: str, **extra: str) -> dict[str, str]:
    """A server's environment: its own probe cache, no probe unless asked, and the dtype
    it serves, always said (``auto`` serves bf16 on some CPUs and fp32 on others: a test
    that compares vectors with the fp32 reference says ``fp32``; ``bf16`` runs bf16's
    code paths on any CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGE_TRIO_")}
    env.update({"BGE_TRIO_CACHE_DIR": str(tmp_path / "cache"), "BGE_TRIO_PROBE": "off"})
    env.update({"BGE_TRIO_DTYPE": dtype, **extra})
    return env


HYPERCORN = [
    sys.executable,
    "-m",
    "hypercorn",
    "--worker-class",
    "trio",
    "--bind",
    "127.0.0.1:0",
    "bge_trio.asgi:app",
]


def bge_trio() -> list[str]:
    return [sys.executable, "-m", "bge_trio.cli"]


def wait_for_url(process: subprocess.Popen[str], lines: list[str]) -> str:
    """The server's URL from its startup log; every stderr line is kept in ``lines``."""
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError("server exited early:\n" + "".join(lines))
        lines.append(line)
        match = re.search(r"Running on (http://\S+)", line)
        if match:
            # keep draining stderr so the server never blocks on a full pipe
            threading.Thread(target=lambda: lines.extend(process.stderr or []), daemon=True).start()
            return match.group(1)
    raise AssertionError("no 'Running on' line")


def wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became healthy")


@attrs.frozen
class Served:
    process: subprocess.Popen[str]
    url: str
    stderr: list[str]  # the server's log so far (it keeps growing)


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str]) -> Iterator[Served]:
    """Start a server process and wait until it is healthy; stop it if the test leaves it up.

    SIGTERM first: hypercorn's parent process passes it to its worker processes, which a
    kill would leave behind.
    """
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        url = wait_for_url(process, lines)
        wait_healthy(url)
        yield Served(process, url, lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
