"""How the C heap hands memory to tensors, chosen for predictable peaks.

glibc serves large allocations with mmap, but it raises its mmap threshold
dynamically (up to 32 MiB) each time such a block is freed. After a few forward
passes most activation tensors come from the heap instead, and freed heap
memory stays resident until something trims it. The peak resident size of the
same forward pass then varies by +-20 % from one run to the next and grows with
history, which is exactly what a memory budget cannot live with.

Fixing the threshold at 1 MiB (``predictable``, the default) turns that off:
every activation tensor is mapped when allocated and unmapped when freed, so the
resident size follows the live tensors and the same pass peaks at the same
size every time (measured on all-MiniLM-L6-v2: spread under 1 % instead of
+-20 %, and about half the peak). The price is page faults on every pass, about
20-35 % of forward time on a small model. ``fast`` keeps glibc's dynamic
behaviour; the probe still measures it, but with more noise, so keep the safety
factor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

from bge_trio.config import Allocator

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from <malloc.h>
PREDICTABLE_MMAP_THRESHOLD = 1 << 20


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process (loaded once)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else ctypes.CDLL(None)


def configure_allocator(mode: Allocator) -> bool:
    """Apply ``mode`` to this process; False where the C library has no mallopt."""
    if mode == "fast":
        return True
    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError):
        log.warning("no mallopt in this C library; memory peaks may vary between passes")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, PREDICTABLE_MMAP_THRESHOLD))
