"""Fuzzing from the served OpenAPI document: schemathesis, every check, against a real server.

The document is the contract: requests it allows are answered 2xx, requests it forbids
are refused with a 4xx, no request is a 5xx, and every response (status, content type,
headers, body) is one the document describes. The server runs the tiny BGE-M3-layout
model with limits small enough that the document states them all exactly (queries x
documents never exceeds the pair limit; no text reaches the model's length).
Every phase runs: the document's examples, coverage of its boundaries, and fuzzing
(random bodies the document allows, which is what found a 500 for one-token inputs with
compact ColBERT encodings). The example count and the time are bounded (CI time); the
seed is fixed so a failure reproduces:

    schemathesis run URL/openapi.json --checks all --phases examples,coverage,fuzzing \
        --seed 1 --max-examples 60 --max-time 30

The served model is bf16, so the fuzzer exercises bf16 serving on any CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bge_trio.testing.processes import bge_trio, env_for, serving

pytestmark = pytest.mark.slow  # a server process and schemathesis

MAX_EXAMPLES = 60
MAX_TIME_S = 30


@pytest.mark.heavy
def test_every_response_conforms_to_the_openapi_document(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    command = [*bge_trio(), "serve", "--model", str(tiny_model_dir), "--port", "0"]
    env = env_for(
        tmp_path,
        dtype="bf16",
        BGE_TRIO_MAX_BATCH="64",
        BGE_TRIO_MAX_SCORE_PAIRS=str(64 * 64),
        BGE_TRIO_MAX_INPUT_CHARS="300",  # under the model's 512 tokens, so 'error' never fires
        BGE_TRIO_LOG_LEVEL="WARNING",
    )
    with serving(command, env) as server:
        fuzz = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                server.url + "/openapi.json",
                "--checks",
                "all",
                "--workers",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--max-time",
                str(MAX_TIME_S),
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    report = fuzz.stdout[-6000:] + fuzz.stderr[-2000:]
    assert fuzz.returncode == 0, report
    assert "No issues found" in fuzz.stdout, report
    assert "15 selected / 15 total" in fuzz.stdout, report  # every route was fuzzed
