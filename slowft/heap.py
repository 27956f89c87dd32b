"""Gives memory slowft holds but does not use back to the system.

The C heap's free pages, before the step's high point: torch takes CPU tensors of up to 32 MB
from malloc's heap, and glibc keeps what a block's backward freed there, resident, to the end of
the process: at dim 1024, 100-250 MB when the head, the step's high point, begins. Giving them
back costs a few ms a step; the next block's backward takes its pages from the system again.

The unused end of a recycled buffer: a unit read into a buffer that held a larger one (the head
into a block's, 0.8 GB against 0.5 GB at dim 4096) would keep the difference resident.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import torch

try:
    _LIBC = ctypes.CDLL(None)  # the C library: malloc's and the kernel's calls below
except OSError:
    _LIBC = None


def _releaser():
    libc = _LIBC
    if libc is not None and sys.platform == "darwin" and hasattr(libc, "malloc_zone_pressure_relief"):
        relief = libc.malloc_zone_pressure_relief  # (zone, goal): all zones, as much as it can
        relief.argtypes, relief.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_size_t
        return lambda: relief(None, 0)
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc
        trim = libc.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return lambda: trim(0)
    return None


_release = _releaser()


def release_free_heap() -> None:
    """Returns the heap's free pages to the system, where the C library can (glibc, macOS)."""
    if _release is not None:
        _release()


def _madvise():
    # pages whose contents may go: Linux frees them at once; macOS's malloc uses REUSABLE likewise
    advice = getattr(mmap, "MADV_FREE_REUSABLE" if sys.platform == "darwin" else "MADV_DONTNEED", None)
    if _LIBC is None or advice is None or not hasattr(_LIBC, "madvise"):
        return None
    madvise = _LIBC.madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return lambda addr, n: madvise(addr, n, advice)


_discard = _madvise()


def release_pages(buf: torch.Tensor) -> None:
    """Gives the whole pages inside ``buf`` (a CPU tensor over memory mapped from the OS, not the
    heap) back to the system; their contents are lost, a later write gets fresh pages."""
    if _discard is None or buf.device.type != "cpu":
        return
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    start, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _discard(start, end - start)
