"""Gives the C heap's free pages back to the system before the step's high point.

torch takes CPU tensors of up to 32 MB from malloc's heap. glibc keeps what a block's backward
freed there, resident, to the end of the process: at dim 1024, 100-250 MB when the head, the
step's high point, begins. Giving them back costs a few ms a step; the next block's backward
takes its pages from the system again.
"""
from __future__ import annotations

import ctypes
import sys


def _releaser():
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if sys.platform == "darwin" and hasattr(libc, "malloc_zone_pressure_relief"):
        relief = libc.malloc_zone_pressure_relief  # (zone, goal): all zones, as much as it can
        relief.argtypes, relief.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_size_t
        return lambda: relief(None, 0)
    if hasattr(libc, "malloc_trim"):  # glibc
        trim = libc.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return lambda: trim(0)
    return None


_release = _releaser()


def release_free_heap() -> None:
    """Returns the heap's free pages to the system, where the C library can (glibc, macOS)."""
    if _release is not None:
        _release()
