"""Hand freed heap memory back to the kernel.

Evicting an item frees its buffers to the C allocator, which keeps them for reuse: the
process's resident size (and the cgroup's usage) stays where it was. glibc's malloc_trim
returns the free pages of every arena, which is what makes an eviction visible to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl has no malloc_trim): freed memory is reused, not returned
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def release_free_memory() -> bool:
    """Return the allocator's free pages to the kernel; False where that is not possible."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
