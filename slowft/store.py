"""The work directory: the only code that reads or writes its files.

Layout (``<workdir>/``)::

    SLOWFT_WORKDIR       marks the folder as ours (a folder without it is never written to)
    lock                 held (flock) while a process uses the work dir
    meta.json            where the weights came from, the model's shape, the training run's settings
    journal.json         which version of every unit is durable, and how far an unfinished step got
    params.json, tokenizer.model, extras.safetensors   the source's files, kept for export
    units/<unit>.v<version>.safetensors   a unit's weights (+ its optimizer state), version = updates applied
    scratch/             saved block inputs and journaled gradients; never needed across a restart but
                         the gradient the journal names

A unit is ``tok_embeddings``, ``layers.<i>`` or ``head`` (final norm + output). A new version of a
unit is written beside the old one and only the journal switches to it, so a crash at any moment
leaves the journal naming a complete, consistent set of files. Files are safetensors, read straight
into one buffer per unit (no second copy, the GIL released while reading).
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import faults
from .atomic import fsync_dir, write_atomic, write_bytes_atomic
from .errors import SlowftError

FORMAT = 1
MARKER = "SLOWFT_WORKDIR"
_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
_CODES = {v: k for k, v in _DTYPES.items()}
_UNIT_FILE = re.compile(r"^(?P<unit>.+)\.v(?P<version>\d+)\.safetensors$")
CATEGORIES = ("weights", "optim", "inputs", "grads", "journal")


# ----------------------------------------------------------------------------- safetensors codec

def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes the safetensors layout; tensors are ordered by element size so every offset is aligned."""
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for k in order:
        t = tensors[k].detach()
        if t.numel():
            f.write(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def read_safetensors(path: Path, into: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads each tensor straight into its own allocation, or into the matching tensor of ``into``
    (a recycled buffer): no second copy, and the GIL is released while reading. Separate tensors,
    not views of one buffer, so in-place updates of one never look to autograd like changes to
    another."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header runs past the end")
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", {}) or {}
            tensors = {}
            for k, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                b, e = info["data_offsets"]
                dtype, shape = _CODES[info["dtype"]], info["shape"]
                t = (into or {}).get(k)
                if t is None or t.dtype != dtype or list(t.shape) != shape:
                    t = torch.empty(shape, dtype=dtype)
                if t.numel() * t.element_size() != e - b:
                    raise ValueError(f"tensor {k} has {e - b} bytes for shape {info['shape']}")
                view, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
                f.seek(8 + n + b)
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError("file is shorter than its header says")
                    done += got
                tensors[k] = t
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise SlowftError(f"{path}: unreadable work-dir file ({e}); expected a complete safetensors file") from None
    return tensors, metadata


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
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("optim.") == optim)


# ----------------------------------------------------------------------------- the work directory

class Store:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.stats = IOStats()
        self._lock_fd = None
        self._open()

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
        write_atomic(self.root / "extras.safetensors", lambda f: write_safetensors(f, tensors))

    def read_extras(self) -> dict[str, torch.Tensor]:
        path = self.root / "extras.safetensors"
        return read_safetensors(path)[0] if path.exists() else {}

    # -- units

    def unit_path(self, unit: str, version: int) -> Path:
        return self.root / "units" / f"{unit}.v{version:06d}.safetensors"

    def read_unit(self, unit: str, version: int, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        tensors, _ = read_safetensors(self.unit_path(unit, version), into)
        dt = time.perf_counter() - t0
        self.stats.add("read", "weights", _nbytes(tensors, False), dt)
        self.stats.add("read", "optim", _nbytes(tensors, True), 0.0)
        return tensors

    def write_unit(self, unit: str, version: int, tensors: dict[str, torch.Tensor]) -> int:
        t0 = time.perf_counter()
        faults.hit("unit_write")
        n = write_atomic(self.unit_path(unit, version), lambda f: write_safetensors(f, tensors), "unit_write_data")
        dt = time.perf_counter() - t0
        optim = _nbytes(tensors, True)
        self.stats.add("written", "weights", n - optim, dt)
        self.stats.add("written", "optim", optim, 0.0)
        return n

    def delete_unit(self, unit: str, version: int) -> None:
        self.unit_path(unit, version).unlink(missing_ok=True)

    def unit_versions(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for p in (self.root / "units").iterdir():
            m = _UNIT_FILE.match(p.name)
            if m:
                found.setdefault(m["unit"], []).append(int(m["version"]))
        return found

    def unit_bytes(self, unit: str, version: int) -> int:
        return self.unit_path(unit, version).stat().st_size

    # -- scratch: saved inputs and journaled gradients

    def write_scratch(self, name: str, tensor: torch.Tensor, category: str) -> int:
        t0 = time.perf_counter()
        n = write_atomic(self.root / "scratch" / f"{name}.safetensors", lambda f: write_safetensors(f, {"x": tensor}),
                         "scratch_write_data")
        self.stats.add("written", category, n, time.perf_counter() - t0)
        return n

    def read_scratch(self, name: str, category: str) -> torch.Tensor:
        t0 = time.perf_counter()
        path = self.root / "scratch" / f"{name}.safetensors"
        x = read_safetensors(path)[0]["x"]
        self.stats.add("read", category, x.numel() * x.element_size(), time.perf_counter() - t0)
        return x

    def delete_scratch(self, name: str) -> None:
        (self.root / "scratch" / f"{name}.safetensors").unlink(missing_ok=True)

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
