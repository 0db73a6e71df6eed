"""Servers as real processes: started from their command line, stopped by signal.

One launcher for the tests and the benchmarks: the server's URL comes from hypercorn's
"Running on" line, its log is drained on a thread after it (a server whose stderr pipe
fills up blocks), and it is ready when /health answers 200.
"""

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


def wait_for_url(process: subprocess.Popen[str], lines: list[str], within_s: float = 120) -> str:
    """The server's URL from its startup log; every stderr line is kept in ``lines``."""
    assert process.stderr is not None
    deadline = time.monotonic() + within_s
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


def wait_healthy(url: str, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
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


def start(command: list[str], env: dict[str, str], ready_s: float = 120) -> Served:
    """Start a server process (in a session of its own, so a signal can reach its whole
    group) and wait until it is healthy."""
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        url = wait_for_url(process, lines, ready_s)
        wait_healthy(url, ready_s)
    except BaseException:
        stop(Served(process, "", lines))
        raise
    return Served(process, url, lines)


def stop(served: Served, timeout: float = 30) -> int | None:
    """SIGTERM, then a kill if it has not exited within ``timeout``; its exit status.

    SIGTERM first: hypercorn's parent process passes it to its worker processes, which a
    kill would leave behind.
    """
    process = served.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str]) -> Iterator[Served]:
    """A healthy server process for the block; stopped after it if still up."""
    served = start(command, env)
    try:
        yield served
    finally:
        stop(served)
