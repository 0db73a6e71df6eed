"""The allocator's huge pages: when a process asks for them, and what it started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from bge_trio.memory.allocator import (
    HUGE_PAGES,
    huge_pages_on_request,
    start_tunables,
    tunables_to_start_with,
)


def _sys_root(tmp_path: Path, enabled: str | None) -> Path:
    root = tmp_path / "sys"
    if enabled is not None:
        (root / "kernel/mm/transparent_hugepage").mkdir(parents=True)
        (root / "kernel/mm/transparent_hugepage/enabled").write_text(enabled + "\n")
    return root


@pytest.mark.parametrize(
    ("enabled", "available"),
    [
        ("always [madvise] never", True),
        ("[always] madvise never", True),
        ("always madvise [never]", False),
        (None, False),  # no such file: a kernel without transparent huge pages
    ],
)
def test_huge_pages_are_asked_for_where_the_kernel_gives_them(
    tmp_path: Path, enabled: str | None, available: bool
) -> None:
    root = _sys_root(tmp_path, enabled)
    assert huge_pages_on_request(root) is available
    expected = HUGE_PAGES if available else None
    assert tunables_to_start_with("predictable", {}, root) == expected


def test_fast_and_tunables_of_one_s_own_are_left_as_they_are(tmp_path: Path) -> None:
    root = _sys_root(tmp_path, "always [madvise] never")
    assert tunables_to_start_with("fast", {}, root) is None
    own = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert tunables_to_start_with("predictable", own, root) is None


def test_the_tunables_are_those_the_process_started_with(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    environ = b"HOME=/root\0GLIBC_TUNABLES=glibc.malloc.hugetlb=1\0PATH=/bin\0"
    (tmp_path / "self/environ").write_bytes(environ)
    assert start_tunables(tmp_path) == "glibc.malloc.hugetlb=1"
    (tmp_path / "self/environ").write_bytes(b"HOME=/root\0")
    assert start_tunables(tmp_path) == ""
