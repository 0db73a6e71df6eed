"""What ``bge-trio`` says when it cannot start: one line naming the setting, exit 2.

``main`` runs in this process (see tests/command.py); the process boundary itself, the
console script and plain hypercorn's report, is tested in test_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.command import RunHere
from tests.processes import env_for


def test_missing_model_is_one_clear_line(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(tmp_path, dtype="bf16", BGE_TRIO_MODEL=str(tmp_path / "no-such-model"))
    code, err = bge_trio_here(["serve", "--port", "0"], env)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bge-trio: ")
    assert "does not exist" in lines[0]
    assert "BGE_TRIO_MODEL" in lines[0]


def test_uncached_hub_id_explains_what_to_do(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(
        tmp_path, dtype="bf16", BGE_TRIO_MODEL="BAAI/bge-m3", HF_HOME=str(tmp_path / "hf")
    )
    code, err = bge_trio_here(["serve", "--port", "0"], env)
    assert code == 2
    assert "not in the local Hugging Face cache" in err
    assert "BGE_TRIO_MODEL=bundled" in err


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
    code, err = bge_trio_here(["serve", "--port", "0"], env)
    assert code == 2
    assert err.strip() == f"bge-trio: {name}={value!r}: {expected}"


def test_a_flag_is_checked_as_its_setting(tmp_path: Path, bge_trio_here: RunHere) -> None:
    env = env_for(tmp_path, dtype="bf16")
    code, err = bge_trio_here(["embed", "in.jsonl", "out", "--workers", "0"], env)
    assert code == 2
    assert err.strip() == "bge-trio: BGE_TRIO_WORKERS='0': expected an integer in [1, 64], or auto"
