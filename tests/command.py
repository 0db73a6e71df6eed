"""``bge-trio`` run in this process: its exit code and what it wrote on stderr.

For the command line's refusals (a bad setting, input or store: one line, exit 2), which
end before any serving or embedding starts: the same ``main`` as the console script,
without a process of its own. The environment is set for real (pyarrow's S3 client
reads it through the C library, not ``os.environ``) and restored afterwards, flags the
command exports as settings included.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import attrs
import pytest

from bge_trio.cli import _SETTING_FLAGS, main
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
    for suffix in _SETTING_FLAGS.values():  # exported by main: restored too
        monkeypatch.delenv(PREFIX + suffix, raising=False)
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    # the command's log handler would outlive this test's captured stderr
    monkeypatch.setattr(logging.getLogger("bge_trio"), "_bge_trio_configured", True, raising=False)
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return Ran(code, captured.err, captured.out)


# ``bge_trio_here(argv, env)``: the fixture of that name in conftest.py
RunHere = Callable[[Sequence[str], Mapping[str, str]], Ran]
