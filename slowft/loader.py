"""Meta's llama2 checkpoint format: validate a folder, reshard it into units, and write it back.

Meta splits each tensor across ``consolidated.NN.pth`` files (one per model-parallel rank):
``wq wk wv w1 w3 output`` on dim 0, ``wo w2 tok_embeddings`` on dim 1; norms and ``rope.freqs``
are replicated. Import never holds a whole shard (a 70B shard is 17 GB): every unit re-opens the
shards with ``mmap`` and copies only its slices, then drops the mapping. Export writes each shard
once, tensor by tensor, into a skeleton that ``torch.save`` laid out without data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import faults
from .atomic import fsync_dir, fsync_file, replace_dir, restore_dir, temp_name
from .errors import SlowftError
from .model import ModelArgs
from .progress import progress as progress_of
from .store import FORMAT, Store, empty_packed
from .tokenizer import Tokenizer
from .units import EMBEDDING, HEAD, LAYER, is_layer, is_state, layer

_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
BLOCK_PARAMS = (  # a block's tensors, in the order of Meta's files
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    "attention_norm.weight", "ffn_norm.weight",
)
EXTRAS = ("rope.freqs",)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def split_dim(key: str) -> int | None:
    """The dim Meta shards a tensor on, or None for replicated tensors."""
    return _SPLIT_DIM.get(key.split(".")[-2] if key.count(".") else key)


def unit_of(key: str) -> tuple[str | None, str]:
    """Meta key -> (unit, name inside the unit); unit None for untrained extras like rope.freqs."""
    if key.startswith(LAYER):  # Meta's keys and the units share the block's prefix
        _, i, rest = key.split(".", 2)
        return layer(int(i)), rest
    if key == "tok_embeddings.weight":
        return EMBEDDING, "weight"
    if key in ("norm.weight", "output.weight"):
        return HEAD, key
    return None, key


def meta_key(unit: str, name: str) -> str:
    return f"{unit}.{name}" if is_layer(unit) or unit == EMBEDDING else name


def expected_shapes(args: ModelArgs, with_extras: bool = True) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every key of a llama2 checkpoint, in Meta's order."""
    d, hd, v = args.dim, args.head_dim, args.vocab_size
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    block = {
        "attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.kv_heads * hd, d),
        "attention.wv.weight": (args.kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (args.hidden_dim, d), "feed_forward.w2.weight": (d, args.hidden_dim),
        "feed_forward.w3.weight": (args.hidden_dim, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
    }
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in block.items()})
    if with_extras:
        shapes["rope.freqs"] = (hd // 2,)
    return shapes


def unit_shapes(args: ModelArgs) -> dict[str, dict[str, tuple[int, ...]]]:
    """unit -> {name inside the unit: shape} of its weights."""
    out: dict[str, dict] = {}
    for key, shape in expected_shapes(args, with_extras=False).items():
        unit, name = unit_of(key)
        out.setdefault(unit, {})[name] = shape
    return out


def n_params(args: ModelArgs) -> int:
    """The trained parameters' count (rope.freqs aside)."""
    return sum(torch.Size(s).numel() for s in expected_shapes(args, with_extras=False).values())


def shard_shape(key: str, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    dim = split_dim(key)
    if dim is None:
        return tuple(shape)
    return tuple(s // n if i == dim else s for i, s in enumerate(shape))


# ----------------------------------------------------------------------------- the source folder

def _looks_like_hf(folder: Path) -> bool:
    return (folder / "config.json").exists() or any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SlowftError(f"{path}: unreadable or truncated shard ({reason}); expected a complete torch.save file") from None
    if not isinstance(sd, dict):
        raise SlowftError(f"{path}: expected a dict of tensors (Meta's consolidated.NN.pth)")
    return sd


def check_params(params: dict) -> None:
    """Raises ValueError naming the first value of params.json the model could not be built from."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        v = params.get(k)
        if (k in params or k in ("dim", "n_layers", "n_heads")) and not (v is None and k == "n_kv_heads"):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"'{k}' must be a positive integer")
    for k in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        v = params.get(k)
        if k in params and not (v is None and k == "ffn_dim_multiplier") and not (number(v) and v > 0):
            raise ValueError(f"'{k}' must be a positive number")
    if "vocab_size" in params and (not isinstance(params["vocab_size"], int) or isinstance(params["vocab_size"], bool)):
        raise ValueError("'vocab_size' must be an integer (-1: the tokenizer's)")
    dim, heads = params["dim"], params["n_heads"]
    if dim % heads or heads % (params.get("n_kv_heads") or heads) or dim // heads % 2:
        raise ValueError("dim must divide into n_heads heads of even size, n_heads into n_kv_heads groups")


@dataclass
class MetaSource:
    """A validated Meta llama2 folder: params.json, consolidated.NN.pth shards, tokenizer.model."""

    path: Path
    params: dict
    params_bytes: bytes
    args: ModelArgs
    shards: list[Path]
    tokenizer: Path
    dtype: torch.dtype
    key_order: list[str]

    @classmethod
    def open(cls, path) -> "MetaSource":
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise SlowftError(f"{folder}: no such folder; expected a llama2 folder with params.json and consolidated.NN.pth")
        folder = folder.resolve()
        params_path = folder / "params.json"
        if not params_path.exists():
            if _looks_like_hf(folder):
                raise SlowftError(
                    f"{folder}: this is a Hugging Face folder (config.json / *.safetensors); "
                    "expected Meta's original format: params.json, consolidated.NN.pth, tokenizer.model"
                )
            raise SlowftError(f"{params_path}: missing; expected Meta's params.json (dim, n_layers, n_heads, ...)")
        if not params_path.is_file():
            raise SlowftError(f"{params_path}: not a file; expected Meta's params.json (dim, n_layers, n_heads, ...)")
        raw = params_path.read_bytes()
        try:
            params = json.loads(raw)
            if not isinstance(params, dict):
                raise ValueError("not an object")
            check_params(params)
            args = ModelArgs.from_params(params)
        except (ValueError, TypeError) as e:
            raise SlowftError(f"{params_path}: malformed ({e}); expected Meta's params.json with dim, n_layers, n_heads") from None

        tokenizer = folder / "tokenizer.model"
        if not tokenizer.exists() and (folder.parent / "tokenizer.model").exists():
            tokenizer = folder.parent / "tokenizer.model"  # Meta's download puts it one level up
        if not tokenizer.exists():
            raise SlowftError(f"{folder / 'tokenizer.model'}: missing; expected the sentencepiece tokenizer.model of this model")

        n_words = Tokenizer(tokenizer).n_words
        numbered = sorted((int(m[1]), p) for p in folder.iterdir() if (m := _SHARD.match(p.name)))
        if not numbered:
            raise SlowftError(f"{folder}: no consolidated.00.pth; expected Meta's checkpoint shards consolidated.NN.pth")
        for want, (got, p) in enumerate(numbered):
            if got != want:
                raise SlowftError(f"{folder / f'consolidated.{want:02d}.pth'}: missing; found {len(numbered)} shards numbered up to {numbered[-1][0]:02d}")
        shards = [p for _, p in numbered]
        src = cls(folder, params, raw, args, shards, tokenizer, torch.bfloat16, [])
        src._check_shards()
        if n_words > src.args.vocab_size:
            raise SlowftError(f"{tokenizer}: has {n_words} tokens but the model's embedding has {src.args.vocab_size}; expected this model's tokenizer")
        return src

    def _check_shards(self) -> None:
        """Reads each shard's index (not its data) and checks keys and shapes against params.json."""
        n = len(self.shards)
        first = _load_shard(self.shards[0])
        wq = first.get("layers.0.attention.wq.weight")
        if wq is None or "tok_embeddings.weight" not in first:
            raise SlowftError(f"{self.shards[0]}: expected llama2 keys (tok_embeddings.weight, layers.0.attention.wq.weight, ...)")
        rows = self.args.n_heads * self.args.head_dim
        if wq.shape[0] * n != rows:
            raise SlowftError(
                f"{self.shards[0]}: layers.0.attention.wq.weight has {wq.shape[0]} rows, but params.json "
                f"(dim {self.args.dim}) split over the {n} shard(s) found needs {rows / n:g}; "
                "expected params.json and every consolidated.NN.pth of one checkpoint"
            )
        if self.args.vocab_size <= 0:
            self.args.vocab_size = first["output.weight"].shape[0] * n
        self.key_order = list(first.keys())
        self.dtype = wq.dtype
        want = expected_shapes(self.args, with_extras=False)
        extra_keys = [k for k in self.key_order if k not in want and k not in EXTRAS]
        if extra_keys:
            raise SlowftError(f"{self.shards[0]}: unexpected key {extra_keys[0]} for a llama2 model with {self.args.n_layers} layers")
        for i, path in enumerate(self.shards):
            sd = first if i == 0 else _load_shard(path)
            for key, shape in want.items():
                if key not in sd:
                    raise SlowftError(f"{path}: missing tensor {key}; expected a llama2 shard with {self.args.n_layers} layers")
                expect = shard_shape(key, shape, n)
                if tuple(sd[key].shape) != expect:
                    raise SlowftError(
                        f"{path}: {key} has shape {list(sd[key].shape)}, expected {list(expect)} "
                        f"for params.json with {n} shard(s)"
                    )
            del sd

    def fingerprint(self) -> str:
        """Identifies this exact checkpoint (path, params, shard sizes and times) for the work-dir cache."""
        h = hashlib.sha256(str(self.path).encode() + self.params_bytes)
        for p in self.shards + [self.tokenizer]:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)

    def units_in_file_order(self) -> list[str]:
        order: list[str] = []
        for key in self.key_order:
            unit, _ = unit_of(key)
            if unit is not None and unit not in order:
                order.append(unit)
        return order

    def read_units(self, storage_dtype: torch.dtype, skip: set[str] = frozenset()) -> Iterable[tuple[str, dict]]:
        """Yields (unit, tensors) in file order. Each shard is mapped for one unit at a time and its
        slices are copied straight into the full tensors, so RSS stays near one unit."""
        shapes = expected_shapes(self.args)
        keys_of: dict[str, list[str]] = {}
        for key in self.key_order:
            unit, _ = unit_of(key)
            if unit is not None:
                keys_of.setdefault(unit, []).append(key)
        for unit in self.units_in_file_order():
            if unit in skip:
                continue
            packed = empty_packed({unit_of(key)[1]: shapes[key] for key in keys_of[unit]}, storage_dtype)
            full = {key: packed[unit_of(key)[1]] for key in keys_of[unit]}
            for k, path in enumerate(self.shards):
                mapped = _load_shard(path)
                for key, dest in full.items():
                    piece, dim = mapped[key], split_dim(key)
                    if dim is None:
                        if k == 0:
                            dest.copy_(piece)
                    else:
                        dest.narrow(dim, k * piece.shape[dim], piece.shape[dim]).copy_(piece)
                del mapped, piece
            yield unit, packed
            del full, packed

    def read_extras(self) -> dict[str, torch.Tensor]:
        sd = _load_shard(self.shards[0])
        return {k: sd[k].clone() for k in self.key_order if k in EXTRAS}


# ----------------------------------------------------------------------------- export

class _IndexUnpickler(pickle.Unpickler):
    """Reads a torch.save pickle without data: maps each key to its storage record and offset."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, *args: (storage, offset)
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        return pid[2]  # ('storage', storage_type, key, location, numel)


def _records(path: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Where each tensor's data starts in the file, and where its record's CRC-32 is kept (its
    local header, its data descriptor after the data, its central directory entry), which the
    data's writer must fill in."""
    records = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        central, pos = {}, zf.start_dir
        raw.seek(pos)
        while (head := raw.read(46))[:4] == b"PK\x01\x02":
            name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
            central[raw.read(name_len).decode()] = pos
            pos += 46 + name_len + extra_len + comment_len
            raw.seek(pos)
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        index = _IndexUnpickler(zf.open(pkl)).load()
        for key, (storage, elem_offset) in index.items():
            info = zf.getinfo(f"{prefix}data/{storage}")
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            if elem_offset:
                raise SlowftError(f"{path}: unexpected storage offset in skeleton")
            start = info.header_offset + 30 + name_len + extra_len
            crc_at = [info.header_offset + 14, central[info.filename] + 16]
            if info.flag_bits & 0x08:  # a data descriptor follows the data (torch.save writes one)
                raw.seek(start + info.compress_size)
                crc_at.append(start + info.compress_size + (4 if raw.read(4) == b"PK\x07\x08" else 0))
            records[key] = (start, tuple(crc_at))
    return records


def check_split(shapes: dict[str, tuple[int, ...]], key_order: list[str], shards: int, flag: str = "--shards") -> None:
    """Every sharded tensor must split into ``shards`` equal parts, as Meta's loaders expect."""
    for key in key_order:
        dim = split_dim(key)
        if dim is not None and shapes[key][dim] % shards:
            raise SlowftError(f"{flag} {shards}: {key} of shape {list(shapes[key])} does not split into {shards} equal parts on dim {dim}")


_EXPORT_FILE = re.compile(r"^(params\.json|tokenizer\.model|consolidated\.\d+\.pth|\.DS_Store)$")


def foreign_file(folder: Path) -> str | None:
    """The first entry of ``folder`` that an export does not write (None for an export, or empty)."""
    return next((p.name for p in sorted(Path(folder).iterdir()) if not _EXPORT_FILE.match(p.name)), None)


def check_export_dir(out_dir: Path) -> None:
    """An export replaces its folder whole: only an earlier export (or an empty folder) may be
    there, never a folder of the user's, such as a model Meta's way (it holds checklist.chk)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SlowftError(f"{out_dir}: is a file; expected a folder for the export")
    other = foreign_file(out_dir)
    if other:
        raise SlowftError(f"{out_dir}: holds {other}, which an export does not write; expected no folder there "
                          "or an earlier export to replace (pass another --out)")


def write_meta_checkpoint(
    out_dir: Path,
    units: Iterable[tuple[str, dict[str, torch.Tensor]]],
    shapes: dict[str, tuple[int, ...]],
    key_order: list[str],
    extras: dict[str, torch.Tensor],
    params_bytes: bytes,
    tokenizer: Path,
    shards: int,
    dtype: torch.dtype,
    progress: Callable[[str, int], None] | None = None,
) -> None:
    """Writes a Meta-format folder atomically (complete or absent).

    ``units`` yields (unit, tensors) with full, unsharded tensors; each shard file is laid out
    first without data (torch.save under ``skip_data``) and then filled tensor by tensor. Trained
    tensors are written in ``dtype``; ``extras`` (untrained, like rope.freqs) in their own.
    """
    out_dir = Path(out_dir).resolve()
    check_split(shapes, key_order, shards)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(out_dir)  # after an export that was killed
    check_export_dir(out_dir)
    tmp = temp_name(out_dir)
    tmp.mkdir()
    try:
        paths = [tmp / f"consolidated.{k:02d}.pth" for k in range(shards)]
        dtypes = {key: extras[key].dtype if key in extras else dtype for key in key_order}
        for path in paths:
            skeleton = OrderedDict((key, torch.empty(shard_shape(key, shapes[key], shards), dtype=dtypes[key])) for key in key_order)
            with torch.serialization.skip_data():
                torch.save(skeleton, path)
        records = [_records(p) for p in paths]
        fds = [os.open(p, os.O_WRONLY) for p in paths]
        try:
            written: set[str] = set()

            def put(key: str, full: torch.Tensor) -> None:
                written.add(key)
                dim = split_dim(key)
                for k, fd in enumerate(fds):
                    piece = full if dim is None else full.narrow(dim, k * (full.shape[dim] // shards), full.shape[dim] // shards)
                    data = memoryview(piece.to(dtypes[key]).contiguous().reshape(-1).view(torch.uint8).numpy())
                    start, crc_at = records[k][key]
                    pos = 0
                    while pos < len(data):  # chunks: macOS refuses single writes over 2 GB
                        pos += os.pwrite(fd, data[pos : pos + (1 << 30)], start + pos)
                    crc = struct.pack("<I", zlib.crc32(data))  # the skeleton's are 0: zip readers that check would fail
                    for at in crc_at:
                        os.pwrite(fd, crc, at)

            for unit, tensors in units:
                faults.hit("export_unit")
                for name, t in tensors.items():
                    if not is_state(name):
                        put(meta_key(unit, name), t)
                if progress:
                    progress(unit, sum(t.numel() * t.element_size() for t in tensors.values()))
            for key, t in extras.items():
                put(key, t)
            missing = set(key_order) - written
            if missing:
                raise SlowftError(f"{out_dir}: export is missing {sorted(missing)[0]}; expected every key of the source")
            for fd in fds:
                fsync_file(fd)
        finally:
            for fd in fds:
                os.close(fd)
        (tmp / "params.json").write_bytes(params_bytes)
        (tmp / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
        for name in ("params.json", "tokenizer.model"):
            with open(tmp / name, "rb") as f:
                fsync_file(f.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- import into the store

def import_model(src: MetaSource, store: Store, storage_dtype: torch.dtype, progress: bool = True,
                 run: dict | None = None) -> None:
    """Reshards ``src`` into the store's units (version 0); continues an interrupted import.

    ``run`` (a training run's settings) is recorded first, so a run killed during its import
    is still recognised as that run."""
    meta = store.read_json("meta.json")
    if meta is None:
        meta = {
            "format": FORMAT,
            "source": {
                "path": str(src.path), "fingerprint": src.fingerprint(), "shards": len(src.shards),
                "dtype": dtype_name(src.dtype), "key_order": src.key_order, "unit_order": src.units_in_file_order(),
            },
            "args": asdict(src.args),
            "storage_dtype": dtype_name(storage_dtype),
            "imported": False,
            "run": run,
        }
        store.write_json("meta.json", meta)
    elif run is not None and meta.get("run") is None:
        meta["run"] = run
        store.write_json("meta.json", meta)
    if meta["imported"]:
        return
    shapes = expected_shapes(src.args, with_extras=False)
    unit_size: dict[str, int] = {}
    for key, shape in shapes.items():
        unit = unit_of(key)[0]
        unit_size[unit] = unit_size.get(unit, 0) + torch.Size(shape).numel() * storage_dtype.itemsize
    done = {u for u, versions in store.unit_versions().items() if 0 in versions and u in unit_size}
    need = sum(n for u, n in unit_size.items() if u not in done)
    free = store.free_bytes()
    if need > free:
        raise SlowftError(f"{store.root}: import needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free; free space or pass another --workdir")
    with progress_of(sum(unit_size.values()), f"import {src.path.name}", sum(unit_size[u] for u in done), progress) as bar:
        for unit, tensors in src.read_units(storage_dtype, skip=done):
            faults.hit("import_unit")
            store.write_unit(unit, 0, tensors)
            bar.update(unit_size[unit])
            del tensors
    store.write_extras(src.read_extras())
    store.copy_in(src.path / "params.json", "params.json")
    store.copy_in(src.tokenizer, "tokenizer.model")
    store.write_journal({"step": 0, "sweep": None, "versions": dict.fromkeys(unit_size, 0)})
    meta["imported"] = True
    store.write_json("meta.json", meta)
