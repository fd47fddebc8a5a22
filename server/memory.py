"""The server process keeps the memory it frees for the next round (glibc's malloc).

Every round the server builds adapter-sized arrays and drops the previous round's: the
weighted sum, the new global adapter, its ArrayRecord for the broadcast, the replies. An
adapter is hundreds of tensors of 64 KB - 1 MB each. With glibc's defaults such a tensor is
either mmapped (above the 128 KB starting threshold) or taken from the heap, whose top is
given back to the kernel as soon as more than about two tensors' worth is free; either way
the next round's arrays land on pages the kernel has to fault in and zero again. Measured
on a 2-core machine: copying a 168 MB adapter of 448 tensors into new memory took 0.10 s
that way and 0.011 s into memory the process had kept, and those faults were more than
half of a 10-update round's aggregation (``python -m fedlora.simulations.bench.server``).

:func:`reuse_freed_memory` sets two ``mallopt`` parameters for the process:

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): tensors come from the heap, whose freed
  chunks the next round reuses; anything larger is still mmapped and returned when freed.
- ``M_TRIM_THRESHOLD`` = 1 GiB: the heap's top is given back only when more than that is
  free, so the round-to-round churn of adapters up to a few hundred MB stays resident.

The cost: after its peak the process holds up to 1 GiB of free heap that other processes
cannot use (it is reused by the server itself). Elsewhere than glibc (macOS, musl) this is
a no-op and returns False.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory(*, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tune glibc's malloc as described in the module docstring; True when both took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts and ignores everything
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
