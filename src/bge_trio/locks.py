"""A host-wide lock on a file, for work that sibling processes must not do at once.

Processes that start together (hypercorn workers, Ray actors on one node) would each run
the memory probe, or each convert the model for OpenVINO: the probe's peaks would be each
other's, and every conversion would hold the fp32 model beside the others. ``flock`` on a
file in the cache directory lets one do it while the others wait, then find its result.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` (created if missing) while the block runs.
    Blocks until it is free: call it from a worker thread, never the event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
