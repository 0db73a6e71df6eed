"""The memory limit from real files in fake cgroup v1/v2 trees, and the budget arithmetic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bge_trio.memory.budget import Budget, MemoryLimit, detect_memory_limit
from bge_trio.memory.cost import CostModel
from bge_trio.memory.plan import MemoryPlan, MemoryTooSmallError, check_fits

GIB = 1 << 30


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _write(tmp_path, "proc/meminfo", "MemTotal: 32000000 kB\nMemAvailable: 20000000 kB\n")
    return tmp_path


def _v2(root: Path, group: str, limits: dict[str, str]) -> None:
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "proc/self/cgroup", f"0::{group}\n")
    for rel, value in limits.items():
        _write(root, f"sys/fs/cgroup/{rel}/memory.max".replace("//", "/"), value + "\n")


def test_v2_nested_groups_take_the_smallest(root: Path) -> None:
    _v2(
        root,
        "/kubepods/pod1/ctr",
        {
            "kubepods": str(2 * GIB),
            "kubepods/pod1": str(GIB),
            "kubepods/pod1/ctr": "max",
        },
    )
    limit = detect_memory_limit(root)
    assert limit.bytes == GIB
    assert limit.source.startswith("cgroup2:")
    assert limit.source.endswith("kubepods/pod1/memory.max")


def test_v2_max_everywhere_falls_back_to_meminfo(root: Path) -> None:
    _v2(root, "/a/b", {"a": "max", "a/b": "max"})
    assert detect_memory_limit(root) == MemoryLimit(20000000 * 1024, "meminfo")


def test_v2_private_namespace_reads_the_mount_root(root: Path) -> None:
    _v2(root, "/", {"": str(512 << 20)})
    limit = detect_memory_limit(root)
    assert limit.bytes == 512 << 20


def test_v2_group_path_missing_under_mount(root: Path) -> None:
    # cgroup namespaces: /proc/self/cgroup names a path the container cannot see
    _v2(root, "/docker/abc", {"": str(3 * GIB)})
    assert detect_memory_limit(root).bytes == 3 * GIB


def _v1(root: Path, group: str, limits: dict[str, int]) -> None:
    _write(root, "proc/self/cgroup", f"5:cpu,cpuacct:/x\n4:memory:{group}\n")
    (root / "sys/fs/cgroup/memory").mkdir(parents=True, exist_ok=True)
    for rel, value in limits.items():
        path = f"sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes".replace("//", "/")
        _write(root, path, f"{value}\n")


def test_v1_huge_values_mean_no_limit(root: Path) -> None:
    _v1(
        root,
        "/docker/abc",
        {
            "": 9223372036854771712,
            "docker": 4 * GIB,
            "docker/abc": 9223372036854771712,
        },
    )
    limit = detect_memory_limit(root)
    assert limit.bytes == 4 * GIB
    assert limit.source.startswith("cgroup1:")


def test_v1_unlimited_falls_back_to_meminfo(root: Path) -> None:
    _v1(root, "/", {"": 9223372036854771712})
    assert detect_memory_limit(root).source == "meminfo"


def test_environment_override_wins(root: Path) -> None:
    _v2(root, "/", {"": str(GIB)})
    assert detect_memory_limit(root, override=123 << 20) == MemoryLimit(123 << 20, "env")


def test_real_machine_limit_is_the_number_in_the_file_it_names() -> None:
    """On this machine, whatever it is: the limit and its source agree with the real files."""
    limit = detect_memory_limit()
    if limit.source == "meminfo":
        lines = Path("/proc/meminfo").read_text().splitlines()
        (available,) = [int(line.split()[1]) * 1024 for line in lines if "MemAvailable" in line]
        assert abs(limit.bytes - available) < 0.1 * available  # it moves between two reads
    else:
        kind, path = limit.source.split(":", 1)
        assert kind in ("cgroup1", "cgroup2")
        assert limit.bytes == int(Path(path).read_text())


def test_workspace_divides_by_every_concurrent_forward_in_the_cgroup() -> None:
    limit = MemoryLimit(8 * GIB, "env")
    one = Budget(limit, GIB, 256 << 20, 0.7, workers=1, processes=1)
    assert one.workspace_bytes == int((8 * GIB - GIB - (256 << 20)) * 0.7)
    two_workers = Budget(limit, GIB, 256 << 20, 0.7, workers=2, processes=1)
    assert two_workers.workspace_bytes == one.workspace_bytes // 2
    # each process holds its own model copy, and every process forwards concurrently
    three_procs = Budget(limit, GIB, 256 << 20, 0.7, workers=2, processes=3)
    assert three_procs.concurrent_forwards == 6
    assert three_procs.workspace_bytes == int((8 * GIB - 3 * GIB - (256 << 20)) * 0.7 / 6)
    need = 100 << 20
    assert (
        Budget(
            MemoryLimit(three_procs.limit_needed_for(need), "env"), GIB, 256 << 20, 0.7, 2, 3
        ).workspace_bytes
        >= need
    )


def test_too_small_limit_names_the_numbers_and_the_fix() -> None:
    budget = Budget(MemoryLimit(GIB, "env"), 900 << 20, 64 << 20, 0.7, 1, 1)
    plan = MemoryPlan("disabled", CostModel(30_000, 12.0), budget)
    with pytest.raises(MemoryTooSmallError) as caught:
        check_fits(plan, 8192)
    message = str(caught.value)
    # worked out here, not by the code under test: workspace (1 GiB - 900 MiB - 64 MiB) x 0.7,
    # the longest S with 30000·S + 12·S² within it, the smallest limit that fits S = 8192
    workspace = int((60 << 20) * 0.7)
    assert budget.workspace_bytes == workspace
    longest = max(s for s in range(1, 8193) if 30_000 * s + 12 * s * s <= workspace)
    assert f"BGE_TRIO_MAX_SEQ_LENGTH <= {longest}" in message
    check_fits(plan, longest)  # the suggested length does fit
    with pytest.raises(MemoryTooSmallError):
        check_fits(plan, longest + 1)
    found = re.search(r"at least (\d+) bytes", message)
    assert found is not None
    suggested = int(found.group(1))
    need = 30_000 * 8192 + 12 * 8192 * 8192
    assert suggested == pytest.approx((900 << 20) + (64 << 20) + need / 0.7, abs=2)

    def fits_8192_under(limit: int) -> bool:
        candidate = Budget(MemoryLimit(limit, "env"), 900 << 20, 64 << 20, 0.7, 1, 1)
        return candidate.workspace_bytes >= need

    assert fits_8192_under(suggested)
    assert not fits_8192_under(suggested - 1024)
