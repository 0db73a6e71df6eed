"""The probe cache: a fitted cost model kept on disk between starts.

The file is JSON named by a hash of everything that changes what a forward pass
costs: schema and package version, model identity, dtype, max sequence length,
torch version, CPU and intra-op thread count. A file that does not parse or whose
key differs is a miss (with a warning), never a crash. Writes are atomic (temp
file, fsync, rename), and :func:`probe_lock` makes one process on the host probe
while its siblings wait and then reuse the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from bge_trio.locks import held
from bge_trio.memory.cost import CostModel, Point
from bge_trio.model.source import ModelSource

log = logging.getLogger(__name__)
# 2: bf16 means bf16 weights (was autocast); 3: a per-pass constant c; 4: large probe
# shapes only, a fit raised by its constant
SCHEMA_VERSION = 4


@attrs.frozen
class CacheKey:
    fields: Mapping[str, str]

    @property
    def digest(self) -> str:
        blob = json.dumps(dict(self.fields), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


def cpu_identity() -> str:
    """CPU architecture and model name: a different CPU allocates differently."""
    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()} {name}".strip()


def model_identity(source: ModelSource) -> str:
    """The model as the cache keys name it: hub id and revision, or path and weights."""
    if source.revision:
        return f"{source.spec}@{source.revision}"
    return f"{source.path}#{weights_fingerprint(source.path)}"


def weights_fingerprint(model_dir: Path) -> str:
    """A cheap identity of the weight files: names, sizes and their first and last MiB.

    Hashing all of BGE-M3's 2.2 GB would cost seconds at every start; this tells
    different checkpoints apart at a glance.
    """
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.suffix not in {".safetensors", ".bin", ".pt", ".json"} or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:24]


def make_key(**fields: str | int) -> CacheKey:
    return CacheKey({"schema": str(SCHEMA_VERSION), **{k: str(v) for k, v in fields.items()}})


@attrs.frozen
class CachedFit:
    model: CostModel
    points: tuple[Point, ...]
    method: str
    pass_seconds: tuple[tuple[int, int, float], ...] = ()


class ProbeCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, key: CacheKey) -> Path:
        return self.directory / f"probe-{key.digest}.json"

    def load(self, key: CacheKey) -> CachedFit | None:
        path = self.path_for(key)
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("probe cache %s unreadable (%s); probing again", path, exc)
            return None
        try:
            data = json.loads(raw)
            if data["key"] != dict(key.fields):
                log.warning("probe cache %s belongs to another configuration; ignoring", path)
                return None
            model = CostModel(float(data["a"]), float(data["b"]), float(data.get("c", 0.0)))
            if not (model.a > 0 and model.b >= 0 and model.c >= 0):
                raise ValueError("non-positive coefficients")
            points = tuple(
                Point(int(p["batch"]), int(p["seq"]), int(p["peak_bytes"]))
                for p in data.get("points", [])
            )
            timed = tuple((int(b), int(s), float(t)) for b, s, t in data.get("pass_seconds", []))
            return CachedFit(model, points, str(data.get("method", "unknown")), timed)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("probe cache %s is corrupt (%s); probing again", path, exc)
            return None

    def store(
        self,
        key: CacheKey,
        model: CostModel,
        points: tuple[Point, ...],
        method: str,
        pass_seconds: tuple[tuple[int, int, float], ...] = (),
    ) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "key": dict(key.fields),
            "a": model.a,
            "b": model.b,
            "c": model.c,
            "method": method,
            "points": [attrs.asdict(p) for p in points],
            # the probe's passes timed at full depth: a first estimate of the pace
            "pass_seconds": [list(timed) for timed in pass_seconds],
        }
        path = self.path_for(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".probe-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    @contextlib.contextmanager
    def probe_lock(self, key: CacheKey) -> Iterator[None]:
        """Hold the host-wide lock for this key (blocks; call from a worker thread)."""
        with held(self.directory / f"probe-{key.digest}.lock"):
            yield
