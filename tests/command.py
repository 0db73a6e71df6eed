"""``bge-trio`` run in this process: its exit code and what it wrote.

The same ``main`` as the console script, without a process of its own: for the command
line's refusals (a bad setting, input or store: one line, exit 2), ``bge-trio probe``'s
report, and bulk jobs that other tests compare with. Signals, exit codes set by the
server and hypercorn's own behaviour still need a process (tests/test_cli.py). The
environment is set for real (pyarrow's S3 client reads it through the C library, not
``os.environ``) and restored afterwards, with the settings the command exports from its
flags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import attrs
import pytest

from bge_trio.cli import main
from bge_trio.config import PREFIX


@attrs.frozen
class Ran:
    code: int  # the exit code
    stderr: str
    stdout: str


def run_here(
    argv: Sequence[str],
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Ran:
    """``bge-trio ARGV`` with environment ``env`` (a whole environment, as for a process)."""
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    # the command's log handler would outlive this test's captured stderr
    monkeypatch.setattr(logging.getLogger("bge_trio"), "_bge_trio_configured", True, raising=False)
    capsys.readouterr()
    before = set(os.environ)
    try:
        code = main(list(argv))
    finally:  # what main exported from its flags (the rest monkeypatch restores)
        for key in set(os.environ) - before:
            del os.environ[key]
    captured = capsys.readouterr()
    return Ran(code, captured.err, captured.out)


# ``bge_trio_here(argv, env)``: the fixture of that name in conftest.py
RunHere = Callable[[Sequence[str], Mapping[str, str]], Ran]
