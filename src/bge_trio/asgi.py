"""The ASGI entry point: ``hypercorn --worker-class trio 'bge_trio.asgi:app'``.

Settings come from ``BGE_TRIO_*`` environment variables. Run by hypercorn's
worker processes, the app drains on SIGTERM whichever process received it. A bad setting or a
missing model prints one line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys

from quart_trio import QuartTrio

from bge_trio.app import create_app
from bge_trio.config import ConfigError
from bge_trio.hosting import hypercorn_worker
from bge_trio.model.encoder import ModelConfigError
from bge_trio.model.source import ModelNotFoundError


def _build() -> QuartTrio:
    try:
        return create_app(host=hypercorn_worker())
    except (ConfigError, ModelNotFoundError, ModelConfigError) as exc:
        print(f"bge-trio: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


app = _build()
