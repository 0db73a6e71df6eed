"""This process's control groups, read from files below an injectable root.

The memory limit (:mod:`bge_trio.memory.budget`) and the CPU quota (here) are both
found by reading this process's group in ``/proc/self/cgroup`` and walking from its
directory up to the controller's mount: a limit set on any ancestor (a Kubernetes
pod above its container) binds too, so the smallest one wins. Every path is read
below ``root`` so tests can point it at a fake tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs

# cgroup v1 mounts the cpu controller under one of these names (often with symlinks).
_V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


def own_cgroups(root: Path) -> list[tuple[str, str]]:
    """(controllers, path) pairs from /proc/self/cgroup."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return []
    pairs = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            pairs.append((parts[1], parts[2]))
    return pairs


def group_of(root: Path, controller: str) -> str:
    """This process's group path for a v1 ``controller``, or the v2 group for ``""``."""
    for controllers, path in own_cgroups(root):
        if (controller == "" and controllers == "") or (
            controller and controller in controllers.split(",")
        ):
            return path
    return "/"


def walk_up(mount: Path, group: str) -> list[Path]:
    """The group's directory under the mount and each ancestor up to the mount itself.

    Inside a container with a private cgroup namespace the group path may not exist
    under the mount (the mount *is* the group); the mount root is always included.
    """
    dirs = []
    current = mount / group.lstrip("/")
    while True:
        if current.is_dir():
            dirs.append(current)
        if current == mount or mount not in current.parents:
            break
        current = current.parent
    if mount not in dirs and mount.is_dir():
        dirs.append(mount)
    return dirs


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """An integer file's value; None for missing, unreadable, ``max`` or garbage."""
    raw = read_text(path)
    if raw is None or raw == "max":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def is_v2(root: Path) -> bool:
    return (root / "sys/fs/cgroup/cgroup.controllers").is_file()


@attrs.frozen
class CpuLimit:
    """How many CPUs this process may use, and what decided it."""

    cpus: float  # the quota in CPUs, or the affinity count when that is smaller
    affinity: int  # CPUs in this process's affinity mask
    source: str  # "affinity", "cgroup2:<path>", "cgroup1:<path>"

    @property
    def threads(self) -> int:
        """Threads that can run at once without being throttled: the quota rounded down.

        A pod limited to 1.5 CPUs that runs 2 threads spends a third of every period
        throttled, with every thread of a pass stalled; rounding down keeps it whole.
        """
        return max(1, min(self.affinity, math.floor(self.cpus + 1e-9)))


def detect_cpu_limit(root: Path = Path("/"), affinity: int | None = None) -> CpuLimit:
    """The CPU quota of this process's group and its ancestors, and its affinity mask."""
    cores = affinity if affinity is not None else _affinity()
    quota = _cgroup2_cpu(root) if is_v2(root) else _cgroup1_cpu(root)
    if quota is None or quota[0] >= cores:
        return CpuLimit(float(cores), cores, "affinity")
    return CpuLimit(quota[0], cores, quota[1])


def cpu_count(root: Path = Path("/")) -> int:
    """Threads this process can keep busy: the affinity mask capped by the CPU quota."""
    return detect_cpu_limit(root).threads


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cgroup2_cpu(root: Path) -> tuple[float, str] | None:
    mount = root / "sys/fs/cgroup"
    best: tuple[float, str] | None = None
    for directory in walk_up(mount, group_of(root, "")):
        raw = read_text(directory / "cpu.max")
        if raw is None:
            continue
        parts = raw.split()
        if not parts or parts[0] == "max":
            continue
        try:
            quota = int(parts[0])
            period = int(parts[1]) if len(parts) > 1 else 100_000
        except ValueError:
            continue
        if quota > 0 and period > 0 and (best is None or quota / period < best[0]):
            best = (quota / period, f"cgroup2:{directory / 'cpu.max'}")
    return best


def _cgroup1_cpu(root: Path) -> tuple[float, str] | None:
    base = root / "sys/fs/cgroup"
    mount = next((base / name for name in _V1_CPU_MOUNTS if (base / name).is_dir()), None)
    if mount is None:
        return None
    best: tuple[float, str] | None = None
    for directory in walk_up(mount, group_of(root, "cpu")):
        quota = read_int(directory / "cpu.cfs_quota_us")
        period = read_int(directory / "cpu.cfs_period_us")
        if quota is None or period is None or quota <= 0 or period <= 0:
            continue  # -1: no quota
        if best is None or quota / period < best[0]:
            best = (quota / period, f"cgroup1:{directory / 'cpu.cfs_quota_us'}")
    return best
