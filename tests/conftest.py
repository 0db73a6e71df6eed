"""Shared fixtures: the tiny BGE-M3-layout model, the bundled MiniLM, and a real server.

The server runs hypercorn's trio worker in the test's own trio run, bound to
127.0.0.1 port 0, and is called over HTTP with httpx.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from bge_trio.app import create_app
from bge_trio.config import Settings
from bge_trio.engine import Engine
from bge_trio.engine.backend import openvino_directory
from bge_trio.model import openvino as ov_backend
from bge_trio.model.encoder import Encoder, ModelInfo
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource, resolve_model
from bge_trio.scheduler.scheduler import Scheduler, SchedulerStatistics
from bge_trio.testing import build_tiny_m3, build_tiny_reranker
from tests.command import RunHere, run_here
from tests.reference import ReferenceM3, ReferenceReranker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_m3(tmp_path_factory.mktemp("tiny-m3"))


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-reranker"))


@pytest.fixture(scope="session")
def reference_reranker(tiny_reranker_dir: Path) -> ReferenceReranker:
    """FlagReranker's algorithm, written out, on the tiny cross-encoder."""
    return ReferenceReranker(tiny_reranker_dir)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> ReferenceM3:
    """The independent BGE-M3 implementation the server is checked against."""
    return ReferenceM3(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir: Path) -> Encoder:
    return load_encoder(resolve_model(str(tiny_model_dir)), dtype="fp32", threads=1)


@pytest.fixture(scope="session")
def bundled_source() -> ModelSource:
    return resolve_model("bundled")


Conversions = Callable[[ModelSource, str], Path]


@pytest.fixture(scope="session")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> Conversions:
    """Each model's conversion in a dtype, made once for the test run (in its own process,
    as a server makes it); a test that is not about converting starts from one of these
    (see :func:`seed_openvino`). Parallel workers share one directory: the first to ask
    converts and the others wait for its files, as sibling servers do
    (:func:`bge_trio.model.openvino.convert_once`)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the run's directory, above each worker's
        root = tmp_path_factory.getbasetemp().parent / "openvino-conversions"
    else:
        root = tmp_path_factory.mktemp("openvino-conversions")
    root.mkdir(exist_ok=True)

    def conversion(source: ModelSource, dtype: str) -> Path:
        key = hashlib.sha256(f"{source.path.resolve()} {dtype}".encode()).hexdigest()[:16]
        directory = root / key
        ov_backend.convert_once(source.path, directory, half_weights=dtype == "bf16", threads=2)
        return directory

    return conversion


def seed_openvino(conversion: Path, settings: Settings, source: ModelSource) -> Settings:
    """``settings`` whose cache holds ``conversion`` where the server looks for it (hard
    links: nothing is copied, and what a test writes beside them stays its own)."""
    directory = openvino_directory(settings, source)
    directory.mkdir(parents=True)
    for path in conversion.iterdir():
        os.link(path, directory / path.name)
    return settings


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings_for(tmp_path: Path) -> SettingsFactory:
    def make(model: Path | str, **overrides: Any) -> Settings:
        base = Settings(
            model=str(model),
            cache_dir=tmp_path / "cache",
            probe="off",
            batch_wait_ms=1.0,
            dtype="fp32",  # outputs are compared with an fp32 reference
        )
        return attrs.evolve(base, **overrides)

    return make


@attrs.frozen
class Server:
    url: str
    client: httpx.AsyncClient
    engine: Engine  # the app's engine (one model)
    service_app: Any

    @property
    def scheduler(self) -> Scheduler:
        """The engine's scheduler (the model is loaded)."""
        scheduler = self.engine.scheduler
        assert scheduler is not None
        return scheduler

    @property
    def info(self) -> ModelInfo:
        """The served model's description (it is loaded)."""
        info = self.engine.info
        assert info is not None
        return info

    def stats(self) -> SchedulerStatistics:
        """The scheduler's statistics (the model is loaded)."""
        stats = self.engine.statistics().scheduler
        assert stats is not None
        return stats


async def wait_ready(client: httpx.AsyncClient) -> None:
    with trio.fail_after(60):
        while True:
            if (await client.get("/health")).status_code == 200:
                return
            await trio.sleep(0.05)


@asynccontextmanager
async def running_server(
    settings: Settings, *, ready: bool = True, **app_kwargs: Any
) -> AsyncIterator[Server]:
    """A real hypercorn server with the trio worker on 127.0.0.1, port chosen by the OS."""
    app = create_app(settings, exit_on_failure=False, **app_kwargs)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        url = binds[0]
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            if ready:
                await wait_ready(client)
            yield Server(url, client, app.extensions["bge_trio"].default, app)
        stop.set()


@pytest.fixture
async def tiny_server(tiny_model_dir: Path, settings_for: Any) -> AsyncIterator[Server]:
    async with running_server(settings_for(tiny_model_dir)) as server:
        yield server


V1 = Path("/sys/fs/cgroup/memory")
MEMORY_CGROUP_LIMIT = 1024 << 20


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    if not (V1 / "memory.limit_in_bytes").is_file():
        pytest.skip("no writable cgroup v1 memory controller on this machine")
    group = V1 / f"bge-trio-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(MEMORY_CGROUP_LIMIT))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    try:
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def bge_trio_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunHere:
    """``bge-trio`` in this process (tests/command.py): its exit code and output."""
    return partial(run_here, monkeypatch=monkeypatch, capsys=capsys)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--alone",
        choices=("skip", "only", "run"),
        default="run",
        help="tests marked alone: leave them out (a parallel run), run only them, or run them "
        "with the rest (the default)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``--alone=only`` reads only the test modules that mark a test ``alone`` (a module
    costs its imports to collect, and the others would all be deselected)."""
    if config.getoption("alone") != "only" or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    return "mark.alone" not in collection_path.read_text() or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--alone`` selects by the ``alone`` marker; then the heavy tests first, the other
    slow ones next (each in their modules' order), dealt out to the workers of a parallel
    run (``-n``): each worker starts with its share of the long ones, and the short ones
    fill in at the end, instead of one worker busy with a long one while the other waits."""
    mode = config.getoption("alone")
    if mode != "run":
        keep: list[pytest.Item] = []
        left: list[pytest.Item] = []
        for item in items:
            alone = item.get_closest_marker("alone") is not None
            (keep if alone == (mode == "only") else left).append(item)
        config.hook.pytest_deselected(items=left)
        items[:] = keep
    items.sort(key=_weight)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    items[:] = _dealt(items, workers)


def _dealt(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` dealt round-robin into one pile per worker, the piles one after another:
    pytest-xdist's ``worksteal`` hands each worker one contiguous share of the list (the
    piles' sizes are its shares'), and moves work between them only once one runs dry."""
    return [item for pile in range(workers) for item in items[pile::workers]]


def _weight(item: pytest.Item) -> int:
    if item.get_closest_marker("heavy") is not None:
        return 0
    return 1 if item.get_closest_marker("slow") is not None else 2
