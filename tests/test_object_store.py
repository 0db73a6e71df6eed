"""bge-trio embed reading from and writing to S3: a real S3-compatible server (moto's
server mode) on 127.0.0.1, reached through the standard AWS environment variables; and
the store's and the manifest's rules that hold on any filesystem."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_trio.config import Settings
from bge_trio.model.source import ModelSource
from bge_trio.testing.processes import bge_trio, env_for
from tests.command import RunHere
from tests.s3 import BUCKET, fs, mtime, names, put, read_s3, s3_env

__all__ = ["s3_env"]  # the fixture

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps on the warm windowsill.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores.",
    "Le chat dort sur le rebord de la fenêtre.",
]


def corpus_lines(rows: int) -> list[str]:
    lines = [json.dumps({"id": f"d{i}", "text": f"{TEXTS[i % 4]} ({i})"}) for i in range(rows)]
    lines[3] = json.dumps({"id": "d3", "text": "   "})  # empty text
    lines[5] = json.dumps({"text": "no id here"})
    lines[7] = "{not json"
    return lines


def _embed(tmp_path: Path, s3: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bge_trio(), "embed", *args, "--model", "bundled"],
        env=env_for(tmp_path, dtype="fp32", **s3),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _by_id(table: pa.Table) -> dict[Any, Any]:
    """Rows by id; the rows without one (bad lines) under ``None``, their errors listed."""
    rows = table.to_pylist()
    ids = [r["id"] for r in rows if r["id"] is not None]
    assert len(ids) == len(set(ids)), "an id was written twice"
    found: dict[Any, Any] = {r["id"]: r for r in rows if r["id"] is not None}
    found[None] = sorted(r["error"] for r in rows if r["id"] is None)
    return found


@pytest.mark.slow
@pytest.mark.heavy
def test_s3_in_and_out_equals_local_files_and_resumes_there(
    tmp_path: Path,
    s3_env: dict[str, str],
    bge_trio_here: RunHere,
) -> None:
    data = ("\n".join(corpus_lines(40)) + "\n").encode()
    (tmp_path / "in.jsonl").write_bytes(data)
    source = put(s3_env, "round/in.jsonl", data)
    target = f"s3://{BUCKET}/round/out"
    shards = ["--shard-rows", "7"]
    done = _embed(tmp_path, s3_env, source, target, *shards)
    assert done.returncode == 0, done.stderr
    assert "row 7 (id None) skipped: not valid JSON" in done.stderr
    env = env_for(tmp_path, dtype="fp32", **s3_env)
    local = ["embed", str(tmp_path / "in.jsonl"), str(tmp_path / "out"), *shards]
    assert bge_trio_here([*local, "--model", "bundled"], env).code == 0
    # six parts and the manifest, nothing half-written or temporary
    expected = [f"part-{i:05d}.parquet" for i in range(6)]
    assert names(s3_env, "round/out") == sorted(["_manifest.json", *expected])
    on_s3, on_disk = _by_id(read_s3(s3_env, "round/out")), _by_id(pq.read_table(tmp_path / "out"))
    assert len(on_s3) == 39  # 40 rows, two of them without an id
    assert on_s3.keys() == on_disk.keys()
    ids = set(on_s3)
    assert on_s3.pop(None) == on_disk.pop(None) == ["no 'id'", "not valid JSON"]
    for key, row in on_disk.items():
        assert on_s3[key]["error"] == row["error"]
        assert on_s3[key]["tokens"] == row["tokens"]
        if row["dense"] is not None:
            np.testing.assert_allclose(on_s3[key]["dense"], row["dense"], atol=1e-6)
    manifest = json.loads(fs(s3_env).open_input_stream(f"{BUCKET}/round/out/_manifest.json").read())
    assert sorted(manifest["done"]) == expected
    assert manifest["input"] == source

    # the job died after writing parts but before recording the last one: a rerun writes
    # that part again, under the same name, and leaves the others as they are
    store = fs(s3_env)
    written = {n: mtime(store, f"round/out/{n}") for n in expected}
    del manifest["done"]["part-00002.parquet"]
    put(s3_env, "round/out/_manifest.json", json.dumps(manifest).encode())
    store.delete_file(f"{BUCKET}/round/out/part-00002.parquet")
    again = _embed(tmp_path, s3_env, source, target, *shards)
    assert again.returncode == 0, again.stderr
    assert "done: 40 rows (37 embedded, 3 with an error) in 6 parts" in again.stderr
    rewritten = {n for n in expected if mtime(store, f"round/out/{n}") != written.get(n)}
    assert rewritten == {"part-00002.parquet"}
    assert set(_by_id(read_s3(s3_env, "round/out"))) == ids

    changed = ["embed", source, target, "--shard-rows", "5", "--model", "bundled"]
    ran = bge_trio_here(changed, env)
    assert ran.code == 2
    assert "holds another job (its shard_rows differ)" in ran.stderr


@pytest.mark.slow  # an S3 server
def test_parquet_from_s3_keeps_integer_ids(
    tmp_path: Path,
    s3_env: dict[str, str],
    bge_trio_here: RunHere,
) -> None:
    table = pa.table({"doc": list(range(9)), "body": [f"{TEXTS[i % 4]} {i}" for i in range(9)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    source = put(s3_env, "pq/in.parquet", sink.getvalue().to_pybytes())
    command = ["embed", source, f"s3://{BUCKET}/pq/out", "--model", "bundled"]
    command += ["--id-column", "doc", "--text-column", "body"]
    env = env_for(tmp_path, dtype="fp32", **s3_env)
    ran = bge_trio_here(command, env)
    assert ran.code == 0, ran.stderr
    out = read_s3(s3_env, "pq/out")
    assert out.schema.field("id").type == pa.int64()
    assert sorted(out.column("id").to_pylist()) == list(range(9))
    assert out.column("error").null_count == 9


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "source", "target", "message"),
    [
        ("none", "nothing/in.jsonl", "bad/out1", "s3://corpus/nothing/in.jsonl: cannot read it"),
        ("columns", "bad/in.jsonl", "bad/out2", "in.jsonl: no column 'text' (it has: body, id)"),
        ("not_empty", "bad/in.jsonl", "bad/full", "bad/full is not empty and has no _manifest"),
        ("no_bucket", "bad/in.jsonl", "s3://nowhere/out", "s3://nowhere/out: cannot write there"),
    ],
)
def test_bad_objects_are_one_line_naming_them(
    tmp_path: Path,
    s3_env: dict[str, str],
    setup: str,
    source: str,
    target: str,
    message: str,
    bge_trio_here: RunHere,
) -> None:
    put(s3_env, "bad/in.jsonl", b'{"id": 1, "body": "a text"}\n')
    put(s3_env, "bad/full/something", b"x")
    out = target if target.startswith("s3://") else f"s3://{BUCKET}/{target}"
    command = ["embed", f"s3://{BUCKET}/{source}", out, "--model", "bundled"]
    ran = bge_trio_here(command, env_for(tmp_path, dtype="fp32", **s3_env))
    assert ran.code == 2, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("bge-trio embed:")]
    assert len(lines) == 1, ran.stderr
    assert message in lines[0]


@pytest.mark.slow  # the S3 client retries a refused endpoint for seconds
def test_without_credentials_or_endpoint_the_store_is_named(
    tmp_path: Path, bge_trio_here: RunHere
) -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_EC2_METADATA_DISABLED": "true"}
    env.update({k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    command = ["embed", "s3://corpus/in.jsonl", str(tmp_path / "out"), "--model", "bundled"]
    ran = bge_trio_here(command, env_for(tmp_path, dtype="fp32", **env))
    assert ran.code == 2, ran.stderr
    assert "bge-trio embed: s3://corpus/in.jsonl:" in ran.stderr
    assert not os.path.exists(tmp_path / "out")


def test_lines_are_whole_across_read_blocks(tmp_path: Path) -> None:
    from bge_trio.bulk.store import LINES_BLOCK, Location

    lines = [b"x" * (i * 7919 % 40_000) for i in range(3 * LINES_BLOCK // 20_000)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last
    assert path.stat().st_size > 2 * LINES_BLOCK
    assert list(Location.parse(str(path)).lines()) == lines


def test_a_rerun_over_a_changed_input_is_refused(
    tmp_path: Path, bundled_source: ModelSource
) -> None:
    """The manifest keeps a fingerprint of the input: the same command over an input that
    changed since (a row added) must not resume into the same output."""
    from bge_trio.bulk.job import Job, run_local
    from bge_trio.bulk.rows import Columns, InputError
    from bge_trio.bulk.store import Location

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(corpus_lines(8)[:3]) + "\n")
    settings = Settings(model="bundled", dtype="fp32", probe="off", cache_dir=tmp_path / "cache")
    job = Job(
        Location.parse(str(source)),
        Location.parse(str(tmp_path / "out")),
        Columns(),
        frozenset({"dense"}),
        shard_rows=2,
    )
    done = run_local(job, settings, bundled_source, stream=io.StringIO())
    assert (done.rows, done.embedded, done.parts) == (3, 3, 2)
    again = run_local(job, settings, bundled_source, stream=io.StringIO())
    assert (again.rows, again.parts) == (3, 2)  # nothing left to do: the same job
    with source.open("a") as f:
        f.write(json.dumps({"id": "late", "text": "a row added after the first run"}) + "\n")
    with pytest.raises(InputError, match="its input_fingerprint differ"):
        run_local(job, settings, bundled_source, stream=io.StringIO())
