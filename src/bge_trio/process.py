"""One place that prepares a process for inference, used by the server, ``bge-trio
probe`` and the benchmarks alike, so they all measure the same process.

- the allocator (``BGE_TRIO_ALLOCATOR``): glibc's mmap threshold, which decides
  whether memory peaks repeat from pass to pass (see :mod:`bge_trio.memory.allocator`);
- the libraries' own logging: transformers' progress bars and load reports are noise
  in a server's log (model loading reports what matters itself). transformers loads
  only the architectures :mod:`bge_trio.model.transformer` does not write out, so it is
  quietened through its environment, and directly where something imported it already;
- oneDNN's caches of compiled kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, and
  ideep's ``LRU_CACHE_CAPACITY`` above it): bf16 matrix products compile a kernel per
  shape, and both caches keep up to 1,024 of them with their buffers. Every distinct
  batch shape a server meets adds some, never given back, so the resident size would
  grow with traffic past what the budget counted (``benchmarks.form`` measures it:
  94 MiB after 40 random shapes on all-MiniLM-L6-v2 in bf16). A pass uses a handful of
  shapes (each layer repeats them), so a small cache costs nothing measurable in speed
  and bounds the growth (7.5 MiB after the same 40). Set before the first kernel is
  compiled; a value already in the environment is kept.
"""

from __future__ import annotations

import os
import sys

from bge_trio.config import Allocator
from bge_trio.memory.allocator import configure_allocator

# Kernels kept per cache: a few passes' worth of shapes (see the module's docstring).
KERNEL_CACHE_CAPACITY = 16
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def prepare_process(allocator: Allocator) -> bool:
    """Apply the allocator, bound the kernel caches and quiet the libraries; False where
    mallopt is missing."""
    for variable in KERNEL_CACHES:
        os.environ.setdefault(variable, str(KERNEL_CACHE_CAPACITY))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: its environment was read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return configure_allocator(allocator)
