"""The probe cache: hits, misses on every key field, corruption, concurrency, the lock."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import attrs
import pytest

from bge_trio.config import Settings
from bge_trio.memory.budget import Budget, MemoryLimit
from bge_trio.memory.cache import ProbeCache, make_key
from bge_trio.memory.cost import CostModel, Point
from bge_trio.memory.plan import MemoryPlan, cache_key_for, plan_memory, store_correction
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import resolve_model
from bge_trio.testing import build_tiny_m3

FIELDS: dict[str, str | int] = {
    "package": "0.1.0",
    "model": "/models/m3#abc",
    "dtype": "fp32",
    "allocator": "predictable",
    "tunables": "glibc.malloc.hugetlb=1",
    "max_seq": 8192,
    "torch": "2.13.0",
    "cpu": "x86_64 Some CPU",
    "threads": 2,
    "transformer": "bge-trio 1",
}
POINTS = (Point(8, 512, 123456), Point(1, 512, 23456))
WEIGHTS = {".safetensors", ".pt"}


def test_store_then_load_is_a_hit(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    cache.store(key, CostModel(30_000.5, 12.25), POINTS, "vmhwm")
    hit = cache.load(key)
    assert hit is not None
    assert hit.model == CostModel(30_000.5, 12.25)
    assert hit.points == POINTS
    assert hit.method == "vmhwm"


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_any_key_field_change_is_a_miss(tmp_path: Path, field: str) -> None:
    cache = ProbeCache(tmp_path)
    cache.store(make_key(**FIELDS), CostModel(1.0, 1.0), POINTS, "vmhwm")
    changed = {**FIELDS, field: f"{FIELDS[field]}-other"}
    assert cache.load(make_key(**changed)) is None


def test_a_file_with_another_key_is_a_miss(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    path = cache.store(key, CostModel(1.0, 1.0), POINTS, "vmhwm")
    data = json.loads(path.read_text())
    data["key"]["dtype"] = "bf16"
    path.write_text(json.dumps(data))
    assert cache.load(key) is None


@pytest.mark.parametrize(
    "content",
    ["", "{not json", '{"key": {}}', '{"a": 1', "[1, 2]", "\x00\x01garbage"],
    ids=["empty", "garbage", "missing fields", "partial", "wrong type", "binary"],
)
def test_corrupt_or_partial_file_is_a_miss(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    cache.path_for(key).write_text(content)
    with caplog.at_level(logging.WARNING, logger="bge_trio.memory.cache"):
        assert cache.load(key) is None
    (record,) = caplog.records  # said once, naming the file and what happens next
    assert str(cache.path_for(key)) in record.getMessage()
    assert "corrupt" in record.getMessage() or "another configuration" in record.getMessage()


def test_the_tests_cover_every_field_of_the_real_key(tiny_encoder: Encoder) -> None:
    """Every field the server keys its cache on is varied by the miss test above."""
    assert set(cache_key_for(tiny_encoder, Settings(model="tiny"))) == set(FIELDS)


def test_the_allocator_setting_changes_the_key(tiny_encoder: Encoder) -> None:
    keys = {
        make_key(**cache_key_for(tiny_encoder, Settings(model="tiny", allocator=allocator))).digest
        for allocator in ("predictable", "fast")
    }
    assert len(keys) == 2


def test_weights_replaced_in_place_are_a_miss(tmp_path: Path) -> None:
    """A checkpoint overwritten in the same directory (same file names and sizes, other
    weights) must not reuse the measurements of the model it replaced."""
    model = build_tiny_m3(tmp_path / "model", seed=0)
    settings = Settings(model=str(model), dtype="fp32")

    def key() -> dict[str, str | int]:
        return cache_key_for(load_encoder(resolve_model(str(model)), dtype="fp32"), settings)

    cache = ProbeCache(tmp_path / "cache")
    first = key()
    cache.store(make_key(**first), CostModel(1.0, 2.0, 3.0), POINTS, "vmhwm")
    assert cache.load(make_key(**key())) is not None  # the same weights: a hit
    sizes = sorted((p.name, p.stat().st_size) for p in model.iterdir())
    kept = {p.name: p.read_bytes() for p in model.iterdir() if p.suffix not in WEIGHTS}
    build_tiny_m3(model, seed=1)
    for name, data in kept.items():  # only the weights change
        (model / name).write_bytes(data)
    assert sorted((p.name, p.stat().st_size) for p in model.iterdir()) == sizes
    second = key()
    assert {k for k in first if first[k] != second[k]} == {"model"}
    assert cache.load(make_key(**second)) is None


def test_negative_coefficients_are_rejected(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    path = cache.store(key, CostModel(1.0, 1.0), POINTS, "vmhwm")
    data = json.loads(path.read_text())
    data["a"] = -5
    path.write_text(json.dumps(data))
    assert cache.load(key) is None


def test_concurrent_writers_leave_one_whole_file(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    written = [CostModel(1000.0 + i, float(i)) for i in range(16)]
    seen: list[CostModel] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            hit = cache.load(key)
            if hit is not None:
                seen.append(hit.model)

    def writer(model: CostModel) -> None:
        for _ in range(10):
            cache.store(key, model, POINTS, "vmhwm")

    threads = [threading.Thread(target=writer, args=(m,)) for m in written]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    final = cache.load(key)
    assert final is not None
    assert final.model in written
    assert all(model in written for model in seen)  # never a torn read
    assert not list(tmp_path.glob(".probe-*.tmp"))  # no temp files left behind


def test_lock_makes_the_second_holder_wait(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path)
    key = make_key(**FIELDS)
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with cache.probe_lock(key):
            order.append("first in")
            first_in.set()
            time.sleep(0.3)
            order.append("first out")

    def second() -> None:
        first_in.wait()
        with cache.probe_lock(key):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first in", "first out", "second in"]


def _budget() -> Budget:
    return Budget(MemoryLimit(16 << 30, "env"), 500 << 20, 256 << 20, 0.7, 1, 1)


def test_siblings_probe_once_and_reuse(tiny_encoder: Encoder, tmp_path: Path) -> None:
    settings = Settings(model="tiny", cache_dir=tmp_path, probe="auto")
    statuses: list[str] = []

    def start() -> None:
        statuses.append(plan_memory(tiny_encoder, settings, _budget(), progress=None).status)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == ["cache_hit", "cache_hit", "complete"]


def test_modes_force_off_and_overrides(tiny_encoder: Encoder, tmp_path: Path) -> None:
    auto = Settings(model="tiny", cache_dir=tmp_path, probe="auto")
    assert plan_memory(tiny_encoder, auto, _budget(), progress=None).status == "complete"
    assert plan_memory(tiny_encoder, auto, _budget(), progress=None).status == "cache_hit"
    forced = attrs.evolve(auto, probe="force")
    assert plan_memory(tiny_encoder, forced, _budget(), progress=None).status == "complete"
    off = plan_memory(tiny_encoder, attrs.evolve(auto, probe="off"), _budget(), progress=None)
    assert (off.status, off.cost) == ("disabled", CostModel(16384.0, 8.0))
    fixed = attrs.evolve(auto, cost_a=5000.0, cost_b=3.0)
    plan = plan_memory(tiny_encoder, fixed, _budget(), progress=None)
    assert (plan.status, plan.cost) == ("disabled", CostModel(5000.0, 3.0))


def test_unwritable_cache_dir_still_probes(tiny_encoder: Encoder, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings = Settings(model="tiny", cache_dir=blocker / "cache", probe="auto")
    assert plan_memory(tiny_encoder, settings, _budget(), progress=None).status == "complete"


def test_a_failed_cache_write_keeps_the_result_without_probing_again(
    tiny_encoder: Encoder, tmp_path: Path
) -> None:
    settings = Settings(model="tiny", cache_dir=tmp_path, probe="auto")
    key = make_key(**cache_key_for(tiny_encoder, settings))
    ProbeCache(tmp_path).path_for(key).mkdir()  # the cache file's place is taken: writes fail
    measured: list[int] = []
    plan = plan_memory(
        tiny_encoder, settings, _budget(), progress=lambda step: measured.append(step.done)
    )
    assert plan.status == "complete"
    assert measured == list(range(1, len(plan.points) + 1))  # one probe, not two


def test_a_kept_correction_keeps_the_probe_s_pass_times(tmp_path: Path) -> None:
    """A confirmed recalibration rewrites the cache entry; the next start still finds the
    probe's timed passes in it, so its admission has a pace from the first request."""
    settings = Settings(model="m", cache_dir=tmp_path)
    key = make_key(**FIELDS)
    timed = ((1, 8192, 30.5), (4, 2048, 12.0), (16, 512, 9.0))
    limit = MemoryLimit(8 << 30, "env")
    plan = MemoryPlan(
        "complete",
        CostModel(20_000.0, 0.0),
        Budget(limit, 1 << 30, 256 << 20, 0.9, 1, 1),
        POINTS,
        "vmhwm",
        cache_key=key,
        pass_seconds=timed,
    )
    store_correction(plan, settings, 1.5)
    hit = ProbeCache(tmp_path).load(key)
    assert hit is not None
    assert (hit.method, hit.model) == ("recalibrated", CostModel(30_000.0, 0.0))
    assert hit.pass_seconds == timed
