"""The application: the Quart-Trio app, its routes, and its lifecycle.

``before_serving`` only starts the engines as tasks in the app's nursery and
returns at once, so hypercorn's 60 s lifespan startup limit never races the model
load and the memory probe; ``/health`` says when the server is ready. If startup
fails for good (no usable model, a memory limit too small for one text), the
process logs why and exits with status 3 so the orchestrator can act on it.

Given the ``host`` that runs it (see :mod:`bge_trio.hosting`), the app also
handles the signal to stop: the engines drain, and every accepted request has
its answer before hypercorn closes the connections.

The app's engines (:class:`~bge_trio.engine.Engines`, one per served model) are in
``app.extensions["bge_trio"]``; the routes find a request's engine there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import trio
from quart_trio import QuartTrio

from bge_trio import logs
from bge_trio.api import embeddings, errors, hooks, operations, retrieval
from bge_trio.config import Settings
from bge_trio.engine import Engines, serving_engines
from bge_trio.engine.prepare import LoadEncoder
from bge_trio.hosting import Host, watch_for_shutdown
from bge_trio.memory.plan import Planner, plan_memory
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource

log = logging.getLogger(__name__)

EXIT_STARTUP_FAILED = 3


def create_app(
    settings: Settings | None = None,
    *,
    source: ModelSource | None = None,
    root: Path = Path("/"),
    exit_on_failure: bool = True,
    planner: Planner = plan_memory,
    load_encoder: LoadEncoder = load_encoder,
    host: Host | None = None,
) -> QuartTrio:
    """Build the app; raises ConfigError / ModelNotFoundError / ModelConfigError for a bad
    configuration. ``source``: the one model to serve, already resolved."""
    settings = settings or Settings.from_env()
    logs.configure(settings.log_level)
    sources = None if source is None else [source]
    engines = serving_engines(settings, sources, root=root, planner=planner, load=load_encoder)

    app = QuartTrio("bge_trio")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    app.extensions["bge_trio"] = engines
    for blueprint in (embeddings.blueprint, retrieval.blueprint, operations.blueprint):
        app.register_blueprint(blueprint)
    errors.register(app)
    hooks.install(app, settings.api_key)

    @app.before_serving
    async def start_engines() -> None:
        await app.nursery.start(engines.run)
        if exit_on_failure:
            app.nursery.start_soon(_exit_when_failed, engines)
        if host is not None:
            app.nursery.start_soon(watch_for_shutdown, host, engines.begin_shutdown)

    return app


async def _exit_when_failed(engines: Engines) -> None:
    await engines.failed()
    # Give requests that waited at the gate a moment to receive their 503.
    await trio.sleep(0.5)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_STARTUP_FAILED)
