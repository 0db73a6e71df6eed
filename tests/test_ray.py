"""bge-trio embed --ray on a real local Ray cluster (2 CPUs) started by the test, with
files or a real S3-compatible server (moto's) for the input and output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bge_trio.config import Settings
from bge_trio.model.source import ModelSource
from bge_trio.testing.processes import bge_trio, env_for
from tests.command import RunHere
from tests.conftest import Conversions, seed_openvino
from tests.s3 import BUCKET, free_port, names, put, read_s3, s3_env

pytestmark = pytest.mark.slow  # a Ray cluster

__all__ = ["s3_env"]  # the fixture

# a throwaway cluster on loopback, for this test only
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps on the warm windowsill while the rain falls outside.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores.",
    "Le conseil municipal a voté la rénovation de la place centrale.",
]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    ray = str(Path(bge_trio()[0]).with_name("ray"))
    port = free_port()
    # Ray's socket paths must be short; pytest's temporary directories are not
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    start = [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    env = {**os.environ, **RAY_ENV}
    subprocess.run(start, check=True, capture_output=True, timeout=120, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)


def _corpus(path: Path, rows: int) -> None:
    path.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": f"{TEXTS[i % 4]} ({i})"}) + "\n" for i in range(rows)
        )
    )


# Lines a real corpus has: not JSON, blank, without an id, with an empty text. Each bad
# line is one row with its error, never the end of the job.
BAD_LINES = {
    10: "{not json",
    20: '{"id": "d20", "text": "   "}',
    30: '{"text": "no id here"}',
    40: "true",
}


def _with_bad_lines(path: Path) -> None:
    lines = path.read_text().splitlines()
    for number, line in BAD_LINES.items():
        lines[number] = line
    lines.insert(50, "   ")  # blank: not a row
    path.write_text("\n".join(lines) + "\n")


def _errors(directory: Path) -> list[tuple[str | None, str | None]]:
    table = pq.ParquetDataset(str(directory)).read(columns=["id", "error"])
    return sorted(
        zip(table.column("id").to_pylist(), table.column("error").to_pylist(), strict=True),
        key=repr,
    )


def _vectors(directory: Path) -> dict[str, np.ndarray]:
    table = pq.ParquetDataset(str(directory)).read(columns=["id", "dense", "error"])
    table = table.filter(pc.is_null(table.column("error")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    return dict(zip(ids, (np.array(v) for v in table.column("dense").to_pylist()), strict=True))


def _local(tmp_path: Path, source: Path, here: RunHere) -> dict[str, np.ndarray]:
    """The single-process job's vectors of ``source`` (the command, run in this process)."""
    out = tmp_path / "local"
    argv = ["embed", str(source), str(out), "--model", "bundled"]
    ran = here(argv, env_for(tmp_path, dtype="fp32"))
    assert ran.code == 0, ran.stderr
    return _vectors(out)


def _ray_command(cluster: str, source: Path, out: Path) -> list[str]:
    return [
        *bge_trio(),
        "embed",
        str(source),
        str(out),
        "--model",
        "bundled",
        "--ray",
        cluster,
        "--actors",
        "2",
        "--threads-per-actor",
        "1",
        "--shard-rows",
        "16",
    ]


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"EmbedActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.heavy
def test_ray_on_s3_with_openvino_equals_the_single_process_job_bad_lines_and_all(
    tmp_path: Path,
    ray_cluster: str,
    s3_env: dict[str, str],
    bge_trio_here: RunHere,
    bundled_source: ModelSource,
    conversions: Conversions,
) -> None:
    """Actors on the OpenVINO backend (its conversion cached, as a second run finds it;
    converting once among siblings is test_openvino's) against the single-process job on
    torch: the same rows and errors, vectors equal within fp32's difference of backends."""
    data = tmp_path / "in.jsonl"
    _corpus(data, 48)  # three parts of 16
    _with_bad_lines(data)
    source = put(s3_env, "ray/in.jsonl", data.read_bytes())
    command = _ray_command(ray_cluster, Path(source), Path("unused"))
    command[command.index("unused")] = f"s3://{BUCKET}/ray/out"
    command[command.index(str(Path(source)))] = source  # Path() would fold the "//"
    env = env_for(tmp_path, dtype="fp32", BGE_TRIO_BACKEND="openvino", **RAY_ENV, **s3_env)
    seed_openvino(conversions(bundled_source, "fp32"), Settings.from_env(env), bundled_source)
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    on_s3 = read_s3(s3_env, "ray/out")
    assert names(s3_env, "ray/out") == ["_manifest.json"] + [
        f"part-{i:05d}.parquet" for i in range(3)
    ]
    local = _local(tmp_path, data, bge_trio_here)
    # every bad line is one row with its error, as in the single-process job
    errors = sorted(
        zip(on_s3.column("id").to_pylist(), on_s3.column("error").to_pylist(), strict=True),
        key=repr,
    )
    assert len(errors) == 48
    assert errors == _errors(tmp_path / "local")
    assert [e for e in errors if e[1] is not None] == sorted(
        [
            (None, "no 'id'"),
            (None, "not a JSON object"),
            (None, "not valid JSON"),
            ("d20", "'text' is empty"),
        ],
        key=repr,
    )
    table = on_s3.filter(pc.is_null(on_s3.column("error")))
    vectors = dict(
        zip(table.column("id").to_pylist(), table.column("dense").to_pylist(), strict=True)
    )
    good = [f"d{i}" for i in range(48) if i not in BAD_LINES]
    assert sorted(vectors) == sorted(local) == sorted(good)
    for key, vector in local.items():
        np.testing.assert_allclose(vectors[key], vector, atol=1e-4)
        assert np.dot(vectors[key], vector) >= 0.999999  # both unit length
    assert json.loads(on_s3.schema.metadata[b"bge_trio"])["backend"] == "openvino"


def _wait_for_parts(driver: subprocess.Popen[bytes], manifest: Path, parts: int) -> int:
    """Until the manifest records at least ``parts`` parts; how many it records then."""
    deadline = time.monotonic() + 300
    while True:
        done = len(json.loads(manifest.read_text())["done"]) if manifest.exists() else 0
        if done >= parts:
            return done
        assert driver.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.heavy
def test_a_ray_job_survives_an_actor_killed_and_resumes_when_killed_whole(
    tmp_path: Path, ray_cluster: str, bge_trio_here: RunHere
) -> None:
    """One job, both failures: an actor SIGKILLed midway (Ray restarts it and its shard
    runs again: the job goes on), then the driver (as a lost head node or a reclaimed
    machine would); the same command again resumes, and every id is written once with
    the single-process job's vectors."""
    source, out = tmp_path / "in.jsonl", tmp_path / "ray"
    _corpus(source, 480)
    command = _ray_command(ray_cluster, source, out)
    env = env_for(tmp_path, dtype="fp32", **RAY_ENV)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "_manifest.json"
    at_kill = _wait_for_parts(driver, manifest, 3)  # both actors loaded and embedding
    actors = _actor_pids()
    assert actors
    os.kill(actors[0], signal.SIGKILL)
    _wait_for_parts(driver, manifest, at_kill + 4)  # the job went on without it
    driver.kill()
    driver.wait()
    recorded = json.loads(manifest.read_text())["done"]
    assert 3 <= len(recorded) < 30  # stopped midway
    written = {name: (out / name).stat().st_mtime_ns for name in recorded}
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    # the parts recorded before the kill were kept, not embedded again
    assert {name: (out / name).stat().st_mtime_ns for name in recorded} == written
    assert len(json.loads(manifest.read_text())["done"]) == 30
    assert not list(out.glob(".*.partial"))
    resumed, local = _vectors(out), _local(tmp_path, source, bge_trio_here)
    assert sorted(resumed) == sorted(local) == sorted(f"d{i}" for i in range(480))
    for key, vector in local.items():
        np.testing.assert_allclose(resumed[key], vector, atol=1e-5)

    # refused from the manifest, before any Ray connection: run in this process
    changed = bge_trio_here([*command[len(bge_trio()) :], "--shard-rows", "8"], env)
    assert changed.code == 2
    assert "holds another job (its shard_rows differ)" in changed.stderr
