"""Engines: one per served model, what the routes, ``bge-trio probe`` and ``bge-trio embed``
build on (startup in :mod:`.prepare`, the life and the request path in :mod:`.engine`)."""

from bge_trio.engine.engine import EmbedRequest, Engine, EngineStatistics, Reranked, Scored
from bge_trio.engine.inputs import Embedded
from bge_trio.engine.prepare import Prepared, prepare
from bge_trio.engine.registry import Engines, serving_engines

__all__ = [
    "EmbedRequest",
    "Embedded",
    "Engine",
    "EngineStatistics",
    "Engines",
    "Prepared",
    "Reranked",
    "Scored",
    "prepare",
    "serving_engines",
]
