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

Most of those page faults' cost is their number: every 4 KiB page of a fresh tensor is
faulted in on its own. glibc can ask the kernel for transparent huge pages (2 MiB) on the
memory it maps (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), where the host allows them on
request (``/sys/kernel/mm/transparent_hugepage/enabled``: ``madvise`` or ``always``).
Measured on the full-size BGE-M3 stand-in (bf16, 2 threads, Xeon with AMX): one
2,048-token text 1.53-1.59 s -> 1.22-1.25 s, 4 x 256 tokens 644-662 -> 516-538 ms
(``fast``: 1.15-1.22 s and 390-437 ms), with the same peaks (40 and 20 MiB) and the same
resident size between passes over 21 passes of mixed shapes. glibc reads the setting when
a process starts, so the command line starts itself again with it
(:func:`tunables_to_start_with`); the probe cache keys on the tunables a process started
with (:func:`start_tunables`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping
from pathlib import Path

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


TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_on_request(sys_root: Path = Path("/sys")) -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them."""
    try:
        text = (sys_root / "kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    chosen = next((word[1:-1] for word in text.split() if word.startswith("[")), "never")
    return chosen in ("always", "madvise")


def start_tunables(proc_root: Path = Path("/proc")) -> str:
    """The glibc tunables this process started with (what glibc read), or ``""``."""
    try:
        environ = (proc_root / "self/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    prefix = TUNABLES.encode() + b"="
    found = next((entry[len(prefix) :] for entry in environ if entry.startswith(prefix)), b"")
    return found.decode(errors="replace")


def tunables_to_start_with(
    mode: Allocator, environ: Mapping[str, str], sys_root: Path = Path("/sys")
) -> str | None:
    """The ``GLIBC_TUNABLES`` a process should be started again with, or None to go on as
    it is: the predictable allocator on huge pages, where the kernel allows them and the
    environment does not set tunables of its own (those are kept as they are)."""
    if mode != "predictable" or TUNABLES in environ or not huge_pages_on_request(sys_root):
        return None
    return HUGE_PAGES
