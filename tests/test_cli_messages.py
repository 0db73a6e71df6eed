"""What ``bge-trio`` says when it cannot start: one line naming the setting, exit 2.

And what ``bge-trio probe`` prints. ``main`` runs in this process (see tests/command.py);
the process boundary itself, the console script and plain hypercorn's report, is tested
in test_cli.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bge_trio.testing.processes import env_for
from tests.command import RunHere


def test_missing_model_is_one_clear_line(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(tmp_path, dtype="bf16", BGE_TRIO_MODEL=str(tmp_path / "no-such-model"))
    ran = bge_trio_here(["serve", "--port", "0"], env)
    assert ran.code == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bge-trio: ")
    assert "does not exist" in lines[0]
    assert "BGE_TRIO_MODEL" in lines[0]


def test_uncached_hub_id_explains_what_to_do(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(
        tmp_path, dtype="bf16", BGE_TRIO_MODEL="BAAI/bge-m3", HF_HOME=str(tmp_path / "hf")
    )
    ran = bge_trio_here(["serve", "--port", "0"], env)
    assert ran.code == 2
    assert "not in the local Hugging Face cache" in ran.stderr
    assert "BGE_TRIO_MODEL=bundled" in ran.stderr


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BGE_TRIO_WORKERS", "0", "expected an integer in [1, 64], or auto"),
        ("BGE_TRIO_MEMORY_SAFETY", "2", "expected a number in [0.05, 1]"),
        ("BGE_TRIO_TRUNCATE", "maybe", "expected true or false"),
        ("BGE_TRIO_PROBE", "sometimes", "expected one of auto, off, force"),
    ],
)
def test_bad_setting_names_variable_and_range(
    tmp_path: Path,
    bge_trio_here: RunHere,
    name: str,
    value: str,
    expected: str,
) -> None:
    env = env_for(tmp_path, dtype="bf16", **{name: value})
    ran = bge_trio_here(["serve", "--port", "0"], env)
    assert ran.code == 2
    assert ran.stderr.strip() == f"bge-trio: {name}={value!r}: {expected}"


def test_a_flag_is_checked_as_its_setting(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(tmp_path, dtype="bf16")
    ran = bge_trio_here(["embed", "in.jsonl", "out", "--workers", "0"], env)
    assert ran.code == 2
    expected = "bge-trio: BGE_TRIO_WORKERS='0': expected an integer in [1, 64], or auto"
    assert ran.stderr.strip() == expected


def test_probe_command_prints_the_fit_and_writes_the_cache(
    tiny_model_dir: Path, tmp_path: Path, bge_trio_here: RunHere
) -> None:
    argv = ["probe", "--model", str(tiny_model_dir), "--max-seq-length", "128"]
    ran = bge_trio_here(argv, env_for(tmp_path, dtype="bf16"))
    assert ran.code == 0, ran.stderr
    assert "status complete" in ran.stdout
    assert re.search(r"fit: a = [\d.]+ bytes/token, b = [\d.]+ bytes/token\^2", ran.stdout)
    assert "measured MiB" in ran.stdout
    assert list((tmp_path / "cache").glob("probe-*.json"))


def test_a_classifier_with_several_labels_is_refused_at_start(
    tiny_reranker_dir: Path, tmp_path: Path, bge_trio_here: RunHere
) -> None:
    many = tmp_path / "three-labels"
    shutil.copytree(tiny_reranker_dir, many)
    config = json.loads((many / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (many / "config.json").write_text(json.dumps(config))
    ran = bge_trio_here(["probe", "--model", str(many)], env_for(tmp_path, dtype="fp32"))
    assert ran.code == 2
    assert "3 labels" in ran.stderr
