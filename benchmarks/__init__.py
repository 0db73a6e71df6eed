"""Benchmarks for bge-trio (``nox -s bench``); never part of the test suite."""
