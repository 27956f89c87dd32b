"""Durable, atomic file writes: a temp name in the same folder, fsync, rename, fsync the folder.

A reader (or a process restarted after a power cut) sees the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

from . import faults


def fsync_file(fd: int) -> None:
    """fsync; on macOS F_FULLFSYNC, since plain fsync there does not flush the drive's cache."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def replacing(path: Path):
    """Yields a temp name beside ``path`` for the caller to write and fsync; then it becomes
    ``path`` (renamed, folder fsynced), or is removed if the write failed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, write, fault_point: str | None = None) -> int:
    """Calls ``write(file)`` on a temp file, then makes it ``path``. Returns the bytes written."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        if fault_point:
            faults.hit(fault_point)
        fsync_file(f.fileno())
        return f.tell()


def write_bytes_atomic(path: Path, data: bytes) -> int:
    return write_atomic(path, lambda f: f.write(data))


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a completed folder into place; an older folder of that name is moved aside first
    (back again if this fails; ``restore_dir`` after a kill between the two) and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_dir(final: Path) -> None:
    """Cleans up after a replace_dir that was killed: an older folder it had moved aside, where
    nothing took its place, comes back; its temp and old folders (only its: ``.x.old-*`` is not
    ``x.v2``'s) are removed."""
    ours = re.compile(rf"\.{re.escape(final.name)}\.(?:(?P<old>old-)[0-9a-f]{{8}}|[0-9a-f]{{8}}\.tmp)")
    for stale in sorted(final.parent.iterdir()) if final.parent.is_dir() else []:
        m = ours.fullmatch(stale.name)
        if not m or not stale.is_dir():
            continue
        if m["old"] and not final.exists():
            os.replace(stale, final)
        else:
            shutil.rmtree(stale, ignore_errors=True)
