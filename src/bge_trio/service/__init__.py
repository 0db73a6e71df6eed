"""The service layer: startup, the request service, the input rules, the reports."""

from bge_trio.service.embedding import EmbeddingService, Scored
from bge_trio.service.inputs import Embedded

__all__ = ["Embedded", "EmbeddingService", "Scored"]
