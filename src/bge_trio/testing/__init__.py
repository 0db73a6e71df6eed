"""Helpers for exercising bge-trio without downloading anything."""

from bge_trio.testing.tiny_m3 import build_full_m3, build_tiny_m3

__all__ = ["build_full_m3", "build_tiny_m3"]
