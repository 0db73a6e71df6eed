"""Helpers for exercising bge-trio without downloading anything."""

from bge_trio.testing.tiny_m3 import build_full_m3, build_tiny_m3
from bge_trio.testing.tiny_reranker import build_full_reranker, build_tiny_reranker

__all__ = ["build_full_m3", "build_full_reranker", "build_tiny_m3", "build_tiny_reranker"]
