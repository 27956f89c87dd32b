"""The work directory: the only code that reads or writes its files.

Layout (``<workdir>/``)::

    SLOWFT_WORKDIR       marks the folder as ours (a folder without it is never written to)
    lock                 held (flock) while a process uses the work dir
    meta.json            where the weights came from, the model's shape, the training run's settings
    journal.json         which version of every unit is durable, and how far an unfinished step got
    params.json, tokenizer.model, extras.safetensors   the source's files, kept for export
    units/<unit>.v<version>.safetensors   a unit's weights (+ its optimizer state), version = updates applied
    scratch/             saved block inputs and journaled gradients; never needed across a restart but
                         the gradient the journal names. Also spare.<n>: superseded files kept for
                         reuse while the work dir is open

A unit is ``tok_embeddings``, ``layers.<i>`` or ``head`` (final norm + output). A new version of a
unit is written beside the old one and only the journal switches to it, so a crash at any moment
leaves the journal naming a complete, consistent set of files. Files are safetensors, read straight
into one buffer per unit (no second copy, the GIL released while reading).

Every unit is rewritten each step, and each saved input and gradient each step: a file that is
no longer needed is kept as a spare that a later write of the same size overwrites in place. Such
a write allocates nothing on the disk, and no deleted file leaves the SSD blocks to trim (on an
ext4 mounted with ``discard``, each unlink of a block cost 30-40 ms of the disk's time, and
overwriting wrote ~1.6x as fast as a new file plus the unlink of the old one).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import faults
from .atomic import fsync_dir, write_bytes_atomic
from .directio import ALIGN, aligned_empty, borrow, read_file, round_up, write_file_atomic
from .errors import SlowftError
from .units import is_state

FORMAT = 1
MARKER = "SLOWFT_WORKDIR"
_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
_CODES = {v: k for k, v in _DTYPES.items()}
_UNIT_FILE = re.compile(r"^(?P<unit>.+)\.v(?P<version>\d+)\.safetensors$")
CATEGORIES = ("weights", "optim", "inputs", "grads", "journal", "lora")  # (lora: LoRA adapters, journaled)
SPARES = 128  # spare files of one size, at most: a safety net, since each step's writes take them again


# ----------------------------------------------------------------------------- safetensors codec

def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int, int]], int]:
    """The file's first bytes (length + JSON header), each tensor's (key, offset, size) after them,
    and the file's size.
    Tensors are ordered by element size so every offset is aligned to its dtype; the header is
    padded with spaces (as the format allows) so the data starts on a page boundary."""
    header, spans, offset = {}, [], 0
    for k in sorted(tensors, key=lambda k: -tensors[k].element_size()):
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        spans.append((k, offset, n))
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    head = struct.pack("<Q", len(raw)) + raw
    return head, spans, len(head) + offset


def _packed(tensors: dict[str, torch.Tensor], start: int, spans, size: int) -> torch.Tensor | None:
    """The buffer that already holds ``tensors`` exactly where the file wants them (data from
    ``start``), as read_safetensors leaves them: such a unit is written without a copy."""
    if not spans or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors.values()):
        return None
    storage = tensors[spans[0][0]].untyped_storage()
    base = tensors[spans[0][0]].data_ptr() - spans[0][1] - start
    end = base + round_up(size)
    if base % ALIGN or base < storage.data_ptr() or end > storage.data_ptr() + storage.nbytes():
        return None
    for k, offset, _ in spans:
        t = tensors[k]
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.data_ptr() != base + start + offset:
            return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, base - storage.data_ptr(), (end - base,))


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                       take: Callable[[int], torch.Tensor | None] | None = None) -> tuple[torch.Tensor, int]:
    """The whole file in an aligned buffer: (buffer, file size). Tensors that a read left packed are
    used in place (only the header is written in front of them); others are copied into
    ``take(size)`` or a new buffer (on a GPU, this is the copy to the host)."""
    head, spans, size = _layout(tensors, metadata)
    buf = _packed(tensors, len(head), spans, size)
    if buf is None:
        buf = borrow(size, take)
        for k, offset, n in spans:
            if n:
                start = len(head) + offset
                buf[start : start + n].view(tensors[k].dtype).view(tensors[k].shape).copy_(tensors[k].detach())
    buf[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    return buf, size


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     fault_point: str | None = None, direct: bool = True) -> int:
    """Writes a safetensors file atomically (``direct``: bypassing the page cache); returns its size."""
    buf, size = encode_safetensors(tensors, metadata)
    return write_file_atomic(path, buf, size, fault_point, direct)


def _decode(buf: torch.Tensor, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """The tensors of a file image in ``buf``. Each is its own tensor over the buffer, not a view of
    it, so in-place updates of one never look to autograd like changes to another; written back
    with their layout unchanged, the buffer goes out as it is."""
    if size < 8:
        raise ValueError("shorter than a header")
    (n,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
    if n > size - 8:
        raise ValueError("header runs past the end")
    header = json.loads(buf[8 : 8 + n].numpy().tobytes())
    metadata = header.pop("__metadata__", {}) or {}
    storage, at = buf.untyped_storage(), buf.storage_offset() + 8 + n
    tensors = {}
    for k, info in header.items():
        b, e = info["data_offsets"]
        dtype, shape = _CODES[info["dtype"]], info["shape"]
        if e > size - 8 - n or torch.Size(shape).numel() * dtype.itemsize != e - b:
            raise ValueError(f"tensor {k}: {e - b} bytes at {b} for shape {shape}; file is {size} bytes")
        if (at + b) % dtype.itemsize:  # a file laid out by someone else: copy out
            tensors[k] = buf[8 + n + b : 8 + n + e].clone().view(dtype).view(shape)
        else:
            tensors[k] = torch.empty(0, dtype=dtype).set_(storage, (at + b) // dtype.itemsize, shape)
    return tensors, metadata, size


def read_safetensors(path: Path, take: Callable[[int], torch.Tensor | None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a whole file into one aligned buffer (``take(nbytes)`` may lend a recycled one), in a
    single pass with the GIL released. Returns (tensors, metadata)."""
    return _load(path, take)[:2]


def _load(path: Path, take=None, direct: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    try:
        return _decode(*read_file(path, take, direct))
    except (OSError, EOFError, ValueError, KeyError, struct.error) as e:
        raise SlowftError(f"{path}: unreadable work-dir file ({e}); expected a complete safetensors file") from None


def empty_packed(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Uninitialised tensors laid out in one buffer as their file will be: filled in place (as
    import fills them), they are written without a copy."""
    head, spans, size = _layout({k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}, None)
    buf = aligned_empty(size)
    buf[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    return _decode(buf, size)[0]


def pack(tensors: dict[str, torch.Tensor], take: Callable[[int], torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Host copies of ``tensors`` laid out in one buffer as their file will be, so writing them
    needs no further copy (on a GPU, this is the copy to the host)."""
    return _decode(*encode_safetensors(tensors, take=take))[0]


# ----------------------------------------------------------------------------- accounting

@dataclass
class IOStats:
    """Bytes moved and seconds spent, per category; thread-safe, since the I/O thread writes it."""

    read: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    written: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, category: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            getattr(self, kind)[category] += nbytes
            self.seconds += seconds

    def snapshot(self) -> dict:
        with self._lock:
            return {"read": dict(self.read), "written": dict(self.written), "seconds": self.seconds}

    @staticmethod
    def delta(now: dict, before: dict) -> dict:
        return {
            "read": {k: now["read"][k] - before["read"][k] for k in CATEGORIES},
            "written": {k: now["written"][k] - before["written"][k] for k in CATEGORIES},
            "seconds": now["seconds"] - before["seconds"],
        }


def _nbytes(tensors: dict[str, torch.Tensor], optim: bool) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if is_state(k) == optim)


# ----------------------------------------------------------------------------- the work directory

class Store:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.stats = IOStats()
        self.direct = True  # units and scratch bypass the page cache (see directio); the model decides
        self._lock_fd = None
        self._spares: list[tuple[Path, int]] = []  # (file, size), retired by one I/O thread, reused by another
        self._spares_lock = threading.Lock()
        self._open()

    @staticmethod
    def storage_dtype_of(root: Path) -> tuple[str, str] | None:
        """(source fingerprint, storage dtype) of the import in an existing work dir, read
        without opening it (no lock, nothing created); None where there is none."""
        try:
            meta = json.loads((root / "meta.json").read_text()) if (root / MARKER).exists() else None
            return (meta["source"]["fingerprint"], meta["storage_dtype"]) if meta else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- opening, locking, resetting

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlowftError(f"{self.root}: cannot create the work dir ({e.strerror}); pass a writable --workdir") from None
        entries = {p.name for p in self.root.iterdir()}
        if entries and MARKER not in entries:  # never write into (or reset) a folder of the user's
            raise SlowftError(
                f"{self.root}: folder is not empty and is not a slowft work dir; expected an empty or slowft work dir"
            )
        if not os.access(self.root, os.W_OK):
            raise SlowftError(f"{self.root}: work dir is not writable; pass a writable --workdir")
        if not entries:
            write_bytes_atomic(self.root / MARKER, b"slowft work dir: safe to delete when no run is in progress\n")

        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SlowftError(f"{self.root}: work dir is in use by another slowft process; wait for it or pass another --workdir") from None
        for sub in ("units", "scratch"):
            (self.root / sub).mkdir(exist_ok=True)

    def close(self) -> None:
        """Deletes the spare files and lets the work dir go."""
        with self._spares_lock:
            spares, self._spares = self._spares, []
        for path, _ in spares:
            path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reset(self) -> None:
        """Removes everything slowft put here (the folder itself stays, locked)."""
        for p in self.root.iterdir():
            if p.name in ("lock", MARKER):
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for sub in ("units", "scratch"):
            (self.root / sub).mkdir()
        fsync_dir(self.root)

    # -- small json/metadata files

    def read_json(self, name: str) -> dict | None:
        path = self.root / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SlowftError(f"{path}: unreadable ({e}); pass --reset-workdir to start this work dir over") from None

    def write_json(self, name: str, data: dict) -> None:
        t0 = time.perf_counter()
        n = write_bytes_atomic(self.root / name, json.dumps(data, indent=1).encode())
        self.stats.add("written", "journal", n, time.perf_counter() - t0)

    def read_journal(self) -> dict | None:
        return self.read_json("journal.json")

    def write_journal(self, journal: dict) -> None:
        faults.hit("journal")
        self.write_json("journal.json", journal)

    def copy_in(self, src: Path, name: str) -> None:
        write_bytes_atomic(self.root / name, Path(src).read_bytes())

    def path(self, name: str) -> Path:
        """Path of a small file kept here (tokenizer.model, params.json) for readers outside the store."""
        return self.root / name

    def write_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(self.root / "extras.safetensors", tensors)

    def read_extras(self) -> dict[str, torch.Tensor]:
        path = self.root / "extras.safetensors"
        return read_safetensors(path)[0] if path.exists() else {}

    # -- units

    def unit_path(self, unit: str, version: int) -> Path:
        return self.root / "units" / f"{unit}.v{version:06d}.safetensors"

    def read_unit(self, unit: str, version: int, take: Callable[[int], torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """A unit's tensors, all in one aligned buffer (``take(nbytes)`` may lend a recycled one)."""
        t0 = time.perf_counter()
        tensors, _, n = _load(self.unit_path(unit, version), take, self.direct)
        dt = time.perf_counter() - t0
        optim = _nbytes(tensors, True)
        self.stats.add("read", "weights", n - optim, dt)
        self.stats.add("read", "optim", optim, 0.0)
        return tensors

    def write_unit(self, unit: str, version: int, tensors: dict[str, torch.Tensor]) -> int:
        """Writes a unit as a new file; tensors still packed as read_unit left them go out uncopied."""
        t0 = time.perf_counter()
        faults.hit("unit_write")
        n = self._write(self.unit_path(unit, version), tensors, "unit_write_data")
        dt = time.perf_counter() - t0
        optim = _nbytes(tensors, True)
        self.stats.add("written", "weights", n - optim, dt)
        self.stats.add("written", "optim", optim, 0.0)
        return n

    def retire_unit(self, unit: str, version: int, current: int) -> None:
        """A superseded version, once the journal names a newer one, ``current``. Kept as a spare
        only where that one has its size: a unit's file grows once, as the optimizer adds its
        state at its first update, and spares of the old size would never be taken (the model's
        size on disk)."""
        path = self.unit_path(unit, version)
        try:
            same = path.stat().st_size == self.unit_path(unit, current).stat().st_size
        except FileNotFoundError:
            same = False
        if same:
            self._retire(path)
        else:
            path.unlink(missing_ok=True)

    def unit_versions(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for p in (self.root / "units").iterdir():
            m = _UNIT_FILE.match(p.name)
            if m:
                found.setdefault(m["unit"], []).append(int(m["version"]))
        return found

    def unit_bytes(self, unit: str, version: int) -> int:
        return self.unit_path(unit, version).stat().st_size

    def state_bytes(self, unit: str, version: int) -> int:
        """Bytes of optimizer state in a unit's file, from its header alone."""
        with open(self.unit_path(unit, version), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return sum(e - b for k, v in header.items() if is_state(k) for b, e in [v["data_offsets"]])

    # -- scratch: saved inputs and journaled gradients

    def write_scratch(self, name: str, tensor: torch.Tensor, category: str) -> int:
        t0 = time.perf_counter()
        n = self._write(self.root / "scratch" / f"{name}.safetensors", {"x": tensor}, "scratch_write_data")
        self.stats.add("written", category, n, time.perf_counter() - t0)
        return n

    def read_scratch(self, name: str, category: str) -> torch.Tensor:
        t0 = time.perf_counter()
        path = self.root / "scratch" / f"{name}.safetensors"
        tensors, _, n = _load(path, direct=self.direct)
        self.stats.add("read", category, n, time.perf_counter() - t0)
        return tensors["x"]

    def retire_scratch(self, name: str) -> None:
        self._retire(self.root / "scratch" / f"{name}.safetensors")

    # -- spare files

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], fault_point: str) -> int:
        """Writes a file atomically, over a spare of its size where one is kept."""
        buf, size = encode_safetensors(tensors)
        return write_file_atomic(path, buf, size, fault_point, self.direct, self._spare(size))

    def _retire(self, path: Path) -> None:
        """Keeps a file nothing needs any more as a spare (see the module's docstring), or deletes it
        where ``SPARES`` of its size are kept."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        with self._spares_lock:
            if sum(n == size for _, n in self._spares) < SPARES:
                spare = self.root / "scratch" / f"spare.{uuid.uuid4().hex[:12]}"
                try:
                    os.replace(path, spare)
                except FileNotFoundError:
                    return
                self._spares.append((spare, size))
                return
        path.unlink(missing_ok=True)

    def _spare(self, size: int) -> Path | None:
        """A spare file of exactly ``size`` bytes for a write to overwrite, if one is kept."""
        with self._spares_lock:
            for i, (path, n) in enumerate(self._spares):
                if n == size:
                    del self._spares[i]
                    return path
        return None

    # -- housekeeping

    def collect_garbage(self, keep_units: dict[str, int], keep_scratch: set[str]) -> None:
        """Deletes what a crash left behind: unit versions the journal does not name, temp files, scratch."""
        for p in (self.root / "units").iterdir():
            m = _UNIT_FILE.match(p.name)
            if not m or keep_units.get(m["unit"]) != int(m["version"]):
                p.unlink(missing_ok=True)
        for p in (self.root / "scratch").iterdir():
            if p.name.removesuffix(".safetensors") not in keep_scratch:
                p.unlink(missing_ok=True)
        for p in self.root.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
