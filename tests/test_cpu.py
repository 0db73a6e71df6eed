"""The CPU quota from real files in fake cgroup v1/v2 trees: threads follow the container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bge_trio.cgroups import CpuLimit, detect_cpu_limit
from tests.conftest import running_server


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(root: Path, group: str, quotas: dict[str, str]) -> None:
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root, "proc/self/cgroup", f"0::{group}\n")
    for rel, value in quotas.items():
        _write(root, f"sys/fs/cgroup/{rel}/cpu.max".replace("//", "/"), value + "\n")


def _v1(root: Path, group: str, quotas: dict[str, tuple[int, int]], mount: str) -> None:
    _write(root, "proc/self/cgroup", f"5:memory:{group}\n4:cpu,cpuacct:{group}\n")
    for rel, (quota, period) in quotas.items():
        base = f"sys/fs/cgroup/{mount}/{rel}".rstrip("/")
        _write(root, f"{base}/cpu.cfs_quota_us", f"{quota}\n")
        _write(root, f"{base}/cpu.cfs_period_us", f"{period}\n")


def test_a_two_cpu_pod_on_a_64_core_node_runs_two_threads(tmp_path: Path) -> None:
    _v2(tmp_path, "/kubepods/pod1/ctr", {"kubepods/pod1/ctr": "200000 100000"})
    limit = detect_cpu_limit(tmp_path, affinity=64)
    assert limit.threads == 2
    assert limit.cpus == 2.0
    assert limit.source.endswith("kubepods/pod1/ctr/cpu.max")


def test_v2_the_smallest_quota_among_ancestors_wins(tmp_path: Path) -> None:
    _v2(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"kubepods": "800000 100000", "kubepods/pod1": "300000 100000", "kubepods/pod1/ctr": "max"},
    )
    limit = detect_cpu_limit(tmp_path, affinity=64)
    assert (limit.threads, limit.cpus) == (3, 3.0)
    assert limit.source.endswith("kubepods/pod1/cpu.max")


def test_v2_no_quota_uses_the_affinity_mask(tmp_path: Path) -> None:
    _v2(tmp_path, "/a", {"a": "max 100000", "": "max"})
    assert detect_cpu_limit(tmp_path, affinity=6) == CpuLimit(6.0, 6, "affinity")


def test_a_fractional_quota_rounds_down_but_never_below_one_thread(tmp_path: Path) -> None:
    _v2(tmp_path, "/a", {"a": "150000 100000"})
    assert detect_cpu_limit(tmp_path, affinity=64).threads == 1
    _v2(tmp_path, "/a", {"a": "50000 100000"})
    limit = detect_cpu_limit(tmp_path, affinity=64)
    assert limit.threads == 1
    assert limit.cpus == pytest.approx(0.5)


def test_an_affinity_mask_smaller_than_the_quota_wins(tmp_path: Path) -> None:
    _v2(tmp_path, "/a", {"a": "800000 100000"})
    assert detect_cpu_limit(tmp_path, affinity=2) == CpuLimit(2.0, 2, "affinity")


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_v1_cfs_quota_and_period(tmp_path: Path, mount: str) -> None:
    _v1(tmp_path, "/docker/abc", {"docker/abc": (400_000, 100_000), "": (-1, 100_000)}, mount)
    limit = detect_cpu_limit(tmp_path, affinity=64)
    assert limit.threads == 4
    assert limit.source.startswith("cgroup1:")
    assert limit.source.endswith("docker/abc/cpu.cfs_quota_us")


def test_v1_unlimited_quota_uses_the_affinity_mask(tmp_path: Path) -> None:
    _v1(tmp_path, "/docker/abc", {"docker/abc": (-1, 100_000)}, "cpu,cpuacct")
    assert detect_cpu_limit(tmp_path, affinity=8) == CpuLimit(8.0, 8, "affinity")


def test_garbage_in_cgroup_files_is_no_quota(tmp_path: Path) -> None:
    _v2(tmp_path, "/a", {"a": "lots 100000"})
    assert detect_cpu_limit(tmp_path, affinity=4).source == "affinity"


async def test_the_server_runs_the_quota_s_threads_and_says_why(
    tiny_model_dir: Path, settings_for: Any, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    _write(root, "proc/meminfo", "MemTotal: 32000000 kB\nMemAvailable: 20000000 kB\n")
    _v2(root, "/pod/ctr", {"pod": "100000 100000"})
    async with running_server(settings_for(tiny_model_dir), root=root) as server:
        cpu = (await server.client.get("/info")).json()["cpu"]
        assert cpu["threads"] == 1
        assert cpu["cpus"] == 1.0
        assert cpu["source"].endswith("pod/cpu.max")
        threads = await server.engine.forward_threads.run_first(torch.get_num_threads)
        assert threads == 1
