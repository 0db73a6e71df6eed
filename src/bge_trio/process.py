"""One place that prepares a process for inference, used by the server, ``bge-trio
probe`` and the benchmarks alike, so they all measure the same process.

- the allocator (``BGE_TRIO_ALLOCATOR``): glibc's mmap threshold, which decides
  whether memory peaks repeat from pass to pass (see :mod:`bge_trio.memory.allocator`);
- the libraries' own logging: transformers' progress bars and load reports are noise
  in a server's log (model loading reports what matters itself).

torch's thread count is not set here: it belongs to each forward thread (see
:func:`bge_trio.model.encoder.set_threads`).
"""

from __future__ import annotations

from bge_trio.config import Allocator
from bge_trio.memory.allocator import configure_allocator


def prepare_process(allocator: Allocator) -> bool:
    """Apply the allocator and quiet the libraries; False where mallopt is missing."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return configure_allocator(allocator)
