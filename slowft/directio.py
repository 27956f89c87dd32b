"""Whole-file reads and atomic writes through aligned buffers, with or without the page cache.

A model larger than memory streams through the work dir every step. Through the page cache the
CPU copies every byte once more, and the cache fills with blocks that are rewritten before they
are read again, pushing out memory in use; so such files go straight between the SSD and our
buffers (``direct``: O_DIRECT on Linux, F_NOCACHE on macOS). Where the cache can hold what
streams, it is used: a read then costs a copy from RAM instead of a trip to the SSD.

O_DIRECT wants the buffer address, the file offset and the length aligned: buffers here start on
an ``ALIGN`` boundary and hold whole ``ALIGN``-sized pages; a file is written in whole pages and
then truncated to its size. Where the filesystem refuses O_DIRECT (tmpfs before Linux 6.6, some
network mounts), I/O goes through the page cache for the rest of the process.
"""
from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from . import faults
from .atomic import fsync_file, replacing

ALIGN = 4096  # a page; O_DIRECT's alignment on every filesystem we expect
_CHUNK = 1 << 30  # bytes per system call: macOS refuses single calls over 2 GB
_F_NOCACHE = getattr(fcntl, "F_NOCACHE", 48)  # macOS
supported = hasattr(os, "O_DIRECT") or sys.platform == "darwin"  # cleared once a filesystem refuses


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def anonymous_pages(nbytes: int) -> mmap.mmap:
    """``round_up(nbytes)`` bytes on whole pages, mapped straight from the OS. Private: pages of
    it let go (heap.release_pages) are freed, where those of a shared mapping (mmap's default)
    would only leave RSS and stay in memory."""
    return mmap.mmap(-1, round_up(max(1, nbytes)), flags=mmap.MAP_PRIVATE)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor on ``anonymous_pages(nbytes)``: aligned for O_DIRECT, and given back whole
    when freed, where the allocator might keep a block-sized buffer it was handed back in its
    free lists."""
    return torch.frombuffer(anonymous_pages(nbytes), dtype=torch.uint8)


def borrow(nbytes: int, take: Callable[[int], torch.Tensor | None] | None) -> torch.Tensor:
    """``take(nbytes)``'s recycled buffer where it lends one big enough, else a new one."""
    buf = take(nbytes) if take else None
    return buf if buf is not None and buf.numel() >= round_up(nbytes) else aligned_empty(nbytes)


def aligned_region(storage: torch.UntypedStorage) -> torch.Tensor:
    """The largest aligned run of whole pages inside ``storage``, as a uint8 tensor."""
    skip = -storage.data_ptr() % ALIGN
    n = (storage.nbytes() - skip) // ALIGN * ALIGN
    return torch.empty(0, dtype=torch.uint8).set_(storage, skip, (max(0, n),))


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """Opens, bypassing the page cache if ``direct`` and the filesystem allows; returns (fd,
    whether O_DIRECT's alignment rules apply)."""
    global supported
    if direct and supported and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            supported = False
            flags &= ~os.O_EXCL  # the refusal comes after the file is made (temp names are unique)
    fd = os.open(path, flags, 0o644)
    if direct and supported and sys.platform == "darwin":
        try:
            fcntl.fcntl(fd, _F_NOCACHE, 1)
        except OSError:
            pass
    return fd, False


def _buffered(fd: int) -> None:
    """Clears O_DIRECT on an open file after the filesystem refused an unbuffered transfer."""
    global supported
    supported = False
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def read_file(path: Path, take: Callable[[int], torch.Tensor | None] | None = None, direct: bool = True) -> tuple[torch.Tensor, int]:
    """Reads a whole file into an aligned buffer: ``take(nbytes)`` may lend a recycled one (at least
    ``round_up(nbytes)`` long), else a new one is made. Returns (buffer, file size); the GIL is
    released while reading. Raises EOFError if the file shrinks while being read."""
    fd, aligned = _open(path, os.O_RDONLY, direct)
    try:
        size = os.fstat(fd).st_size
        buf = borrow(size, take)
        view, f, done = memoryview(buf.numpy()), io.FileIO(fd, "rb", closefd=False), 0
        while done < size:
            f.seek(done)
            try:
                got = f.readinto(view[done : min(done + _CHUNK, round_up(size))])
            except OSError as e:
                if not (aligned and e.errno == errno.EINVAL):
                    raise
                _buffered(fd)
                aligned = False
                continue
            if not got:
                raise EOFError(f"{size - done} bytes missing")
            done += got
            if aligned and done % ALIGN and done < size:  # a short read mid-file: go on unaligned
                _buffered(fd)
                aligned = False
        return buf, size
    finally:
        os.close(fd)


def write_file_atomic(path: Path, buf: torch.Tensor, size: int, fault_point: str | None = None, direct: bool = True,
                      reuse: Path | None = None) -> int:
    """Writes ``size`` bytes from the start of an aligned buffer (at least ``round_up(size)`` long) to
    a temp file, fsyncs it and renames it to ``path``: a reader sees the old file or the new one.
    ``reuse`` names a file nothing needs any more: it becomes the temp file, overwritten in place."""
    with replacing(path) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if reuse is not None:
            try:
                os.replace(reuse, tmp)
                flags = os.O_WRONLY
            except FileNotFoundError:
                pass
        fd, aligned = _open(tmp, flags, direct)
        try:
            view, f, done = memoryview(buf.numpy()), io.FileIO(fd, "wb", closefd=False), 0
            end = round_up(size) if aligned else size
            while done < end:
                f.seek(done)
                try:
                    done += f.write(view[done : min(done + _CHUNK, end)])
                except OSError as e:
                    if not (aligned and e.errno == errno.EINVAL):
                        raise
                    _buffered(fd)
                    aligned, end = False, size
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # whole pages went out (or a longer file was reused); the file ends where its data does
            if fault_point:
                faults.hit(fault_point)
            fsync_file(fd)
        finally:
            os.close(fd)
    return size
