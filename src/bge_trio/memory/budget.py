"""The memory limit this process lives under, and the per-forward workspace it leaves.

The limit is found, first match wins, from: ``BGE_TRIO_MEMORY_LIMIT_BYTES``; the
cgroup v2 ``memory.max`` of this process's group and every ancestor (the smallest
number; ``max`` means none); the cgroup v1 ``memory.limit_in_bytes`` (absurdly large
values mean none); ``MemAvailable`` in /proc/meminfo. Every path is read below a
``root`` so tests can point it at a fake tree (see :mod:`bge_trio.cgroups`).

The workspace of one forward pass is what is left after every process's resident
model and a fixed headroom, times a safety factor, shared between every forward
pass that may run at once in the cgroup::

    workspace = (limit - processes * model_resident - headroom) * safety
                / (workers * processes)
"""

from __future__ import annotations

from pathlib import Path

import attrs

from bge_trio.cgroups import group_of, is_v2, read_int, walk_up

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is none.
V1_UNLIMITED = 1 << 60


@attrs.frozen
class MemoryLimit:
    bytes: int
    source: str  # "env", "cgroup2:<path>", "cgroup1:<path>", "meminfo"


def detect_memory_limit(root: Path = Path("/"), override: int | None = None) -> MemoryLimit:
    """The effective memory limit and where it came from."""
    if override is not None:
        return MemoryLimit(override, "env")
    for finder in (_cgroup2_limit, _cgroup1_limit):
        found = finder(root)
        if found is not None:
            return found
    return MemoryLimit(_mem_available(root), "meminfo")


def _cgroup2_limit(root: Path) -> MemoryLimit | None:
    mount = root / "sys/fs/cgroup"
    if not is_v2(root):
        return None
    best: tuple[int, Path] | None = None
    for directory in walk_up(mount, group_of(root, "")):
        value = read_int(directory / "memory.max")
        if value is not None and (best is None or value < best[0]):
            best = (value, directory)
    if best is None:
        return None
    return MemoryLimit(best[0], f"cgroup2:{best[1] / 'memory.max'}")


def _cgroup1_limit(root: Path) -> MemoryLimit | None:
    mount = root / "sys/fs/cgroup/memory"
    if not mount.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for directory in walk_up(mount, group_of(root, "memory")):
        value = read_int(directory / "memory.limit_in_bytes")
        if value is None or value >= V1_UNLIMITED:
            continue
        if best is None or value < best[0]:
            best = (value, directory)
    if best is None:
        return None
    return MemoryLimit(best[0], f"cgroup1:{best[1] / 'memory.limit_in_bytes'}")


def _mem_available(root: Path) -> int:
    for line in (root / "proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable line in /proc/meminfo")


@attrs.frozen
class Budget:
    """The arithmetic from limit to per-forward workspace, kept for reporting."""

    limit: MemoryLimit
    model_resident_bytes: int
    headroom_bytes: int
    safety: float
    workers: int
    processes: int
    weights_bytes: int = 0  # of model_resident_bytes, the weights (all of them resident)

    @property
    def runtime_bytes(self) -> int:
        """The rest of the resident size: interpreter, torch, tokenizer, buffers."""
        return max(0, self.model_resident_bytes - self.weights_bytes)

    @property
    def concurrent_forwards(self) -> int:
        return self.workers * self.processes

    @property
    def free_bytes(self) -> int:
        """What is left for forward passes across the cgroup, before the safety factor."""
        used = self.processes * self.model_resident_bytes + self.headroom_bytes
        return max(0, self.limit.bytes - used)

    @property
    def workspace_bytes(self) -> int:
        """The most one forward pass may add above its baseline."""
        return int(self.free_bytes * self.safety / self.concurrent_forwards)

    def limit_needed_for(self, workspace: float) -> int:
        """The smallest limit under which one forward pass gets ``workspace`` bytes."""
        used = self.processes * self.model_resident_bytes + self.headroom_bytes
        return int(used + workspace * self.concurrent_forwards / self.safety) + 1
