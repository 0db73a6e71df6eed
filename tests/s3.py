"""A real S3-compatible server for the tests (moto's server mode, on 127.0.0.1), and
what a test needs to put, list and read objects there."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

BUCKET = "corpus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A fresh S3-compatible server with one bucket; the variables a client needs."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint)
            break
        except httpx.TransportError:
            assert server.poll() is None, "the S3 server exited"
            assert time.monotonic() < deadline, "the S3 server never answered"
            time.sleep(0.1)
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    fs(env).create_dir(BUCKET)
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def fs(env: dict[str, str]) -> Any:
    return pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
        endpoint_override=env["AWS_ENDPOINT_URL"],
        allow_bucket_creation=True,
    )


def put(env: dict[str, str], key: str, data: bytes) -> str:
    with fs(env).open_output_stream(f"{BUCKET}/{key}") as f:
        f.write(data)
    return f"s3://{BUCKET}/{key}"


def names(env: dict[str, str], prefix: str) -> list[str]:
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True, recursive=True)
    return sorted(info.base_name for info in fs(env).get_file_info(selector))


def read_s3(env: dict[str, str], prefix: str) -> pa.Table:
    return pq.ParquetDataset(f"{BUCKET}/{prefix}", filesystem=fs(env)).read()


def mtime(fs: Any, key: str) -> Any:
    return fs.get_file_info(f"{BUCKET}/{key}").mtime
