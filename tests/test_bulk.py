"""bge-trio embed: every row exactly once, the server's vectors, resumable after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_trio.testing.processes import bge_trio, env_for
from tests.command import RunHere
from tests.reference import ReferenceM3

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps on the warm windowsill.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores.",
    "Le chat dort sur le rebord de la fenêtre.",
]


def _corpus(path: Path, rows: int, *, bad: bool = True) -> list[dict[str, Any]]:
    records = [{"id": f"d{i}", "text": f"{TEXTS[i % 4]} ({i})"} for i in range(rows)]
    lines = [json.dumps(r) for r in records]
    if bad:
        lines[3] = json.dumps({"id": "d3", "text": "   "})  # empty text
        lines[5] = json.dumps({"text": "no id here"})
        lines[7] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    return records


def _embed(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bge_trio(), "embed", *args],
        env=env_for(tmp_path, dtype="fp32", **env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _read(directory: Path) -> pa.Table:
    return pq.ParquetDataset(str(directory)).read()


@pytest.mark.slow  # a bge-trio embed process
def test_every_row_once_with_the_reference_vectors_and_bad_rows_named(
    tmp_path: Path, tiny_model_dir: Path, reference: ReferenceM3
) -> None:
    records = _corpus(tmp_path / "in.jsonl", 23)
    out = tmp_path / "out"
    done = _embed(
        tmp_path,
        str(tmp_path / "in.jsonl"),
        str(out),
        "--model",
        str(tiny_model_dir),
        "--shard-rows",
        "5",
        "--outputs",
        "dense,sparse,colbert",
    )
    assert done.returncode == 0, done.stderr
    table = _read(out)
    assert table.num_rows == 23  # every input row is one output row
    rows = table.to_pylist()
    failed = sorted((str(r["id"]), r["error"]) for r in rows if r["error"] is not None)
    assert failed == [("None", "no 'id'"), ("None", "not valid JSON"), ("d3", "'text' is empty")]
    for line in ("row 3 (id 'd3') skipped: 'text' is empty", "row 7 (id None) skipped: not valid"):
        assert line in done.stderr
    good = [r for r in rows if r["error"] is None]
    assert sorted(r["id"] for r in good) == sorted(
        rec["id"] for i, rec in enumerate(records) if i not in (3, 5, 7)
    )
    texts = {rec["id"]: rec["text"] for rec in records}
    expected = reference.encode([texts[r["id"]] for r in good])
    for row, ref in zip(good, expected, strict=True):
        np.testing.assert_allclose(row["dense"], ref.dense, atol=1e-5)
        assert row["sparse_ids"] == sorted(ref.sparse)
        np.testing.assert_allclose(
            row["sparse_weights"], [ref.sparse[i] for i in row["sparse_ids"]], atol=1e-5
        )
        np.testing.assert_allclose(row["colbert"], ref.colbert, atol=1e-5)
        assert row["tokens"] == ref.tokens
    meta = json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"bge_trio"])
    assert meta["outputs"] == ["colbert", "dense", "sparse"]
    assert meta["dimension"] == len(expected[0].dense)
    assert (meta["dtype"], meta["backend"]) == ("fp32", "torch")


@pytest.mark.slow  # a bge-trio embed process, killed
def test_a_killed_run_resumes_without_losing_or_duplicating_rows(
    tmp_path: Path, bge_trio_here: RunHere
) -> None:
    _corpus(tmp_path / "in.jsonl", 240, bad=False)
    out, whole = tmp_path / "out", tmp_path / "whole"
    arguments = ["embed", str(tmp_path / "in.jsonl"), str(out), "--model", "bundled"]
    arguments += ["--shard-rows", "10"]
    env = env_for(tmp_path, dtype="fp32")
    run = subprocess.Popen(
        [*bge_trio(), *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["done"]) >= 3:
            break
        assert run.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    parts = len(json.loads(manifest.read_text())["done"])
    assert 3 <= parts < 24  # stopped midway
    # the rerun and an uninterrupted run to compare with: the same command, in this process
    assert bge_trio_here(arguments, env).code == 0
    done = json.loads(manifest.read_text())["done"]
    assert len(done) == 24
    assert not list(out.glob(".*.partial"))
    whole_run = [*arguments[:2], str(whole), *arguments[3:]]
    assert bge_trio_here(whole_run, env).code == 0
    got = sorted(_read(out).to_pylist(), key=lambda r: r["id"])
    want = sorted(_read(whole).to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == sorted(f"d{i}" for i in range(240))  # each exactly once
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["dense"], w["dense"], atol=1e-6)


def test_parquet_input_keeps_integer_ids_and_equals_jsonl(
    tmp_path: Path,
    tiny_model_dir: Path,
    bge_trio_here: RunHere,
) -> None:
    records = _corpus(tmp_path / "in.jsonl", 12, bad=False)
    pq.write_table(
        pa.table({"doc": list(range(12)), "body": [r["text"] for r in records]}),
        tmp_path / "in.parquet",
    )
    env = env_for(tmp_path, dtype="fp32")
    model = ["--model", str(tiny_model_dir)]
    jsonl = ["embed", str(tmp_path / "in.jsonl"), str(tmp_path / "a"), *model]
    assert bge_trio_here(jsonl, env).code == 0
    parquet = ["embed", str(tmp_path / "in.parquet"), str(tmp_path / "b"), *model]
    parquet += ["--id-column", "doc", "--text-column", "body"]
    assert bge_trio_here(parquet, env).code == 0
    from_jsonl, from_parquet = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert from_parquet.schema.field("id").type == pa.int64()
    assert from_parquet.column("id").to_pylist() == list(range(12))
    np.testing.assert_allclose(
        np.array(from_parquet.column("dense").to_pylist()),
        np.array(from_jsonl.column("dense").to_pylist()),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing_column", ["--text-column", "body"], "no column 'body' (it has: id, text)"),
        ("unreadable", [], "in.jsonl: cannot read it"),
        ("not_empty", [], "is not empty and has no _manifest.json"),
        ("other_job", ["--shard-rows", "7"], "holds another job (its shard_rows differ)"),
        ("bad_outputs", ["--outputs", "dense,lexical"], "--outputs takes dense, sparse, colbert"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_or_option(
    tmp_path: Path,
    tiny_model_dir: Path,
    setup: str,
    args: list[str],
    message: str,
    bge_trio_here: RunHere,
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out"
    _corpus(source, 4, bad=False)
    if setup == "unreadable":
        source.unlink()
        source.mkdir()
    if setup == "not_empty":
        out.mkdir()
        (out / "something").write_text("x")
    command = ["embed", str(source), str(out), "--model", str(tiny_model_dir)]
    env = env_for(tmp_path, dtype="fp32")
    if setup == "other_job":
        assert bge_trio_here(command, env).code == 0
    ran = bge_trio_here([*command, *args], env)
    assert ran.code == 2
    lines = [line for line in ran.stderr.splitlines() if line.startswith("bge-trio embed:")]
    assert len(lines) == 1, ran.stderr
    assert message in lines[0]
