"""Meta's original checkpoint format (llama2, CodeLlama, Llama 3.x): validate a folder, reshard it
into units, and write it back.

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
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import faults
from ..atomic import fsync_file
from ..checkpoint import dtype_name, export_folder, expected_shapes, meta_key, unit_of
from ..errors import SlowftError
from ..model import LLAMA3_ROPE_SCALING, ModelArgs
from ..store import empty_packed
from ..tokenizer import load_tokenizer
from ..units import is_state

_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
BLOCK_PARAMS = (  # a block's tensors, in the order of Meta's files
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    "attention_norm.weight", "ffn_norm.weight",
)
EXTRAS = ("rope.freqs",)


def split_dim(key: str) -> int | None:
    """The dim Meta shards a tensor on, or None for replicated tensors."""
    return _SPLIT_DIM.get(key.split(".")[-2] if key.count(".") else key)


def shard_shape(key: str, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    dim = split_dim(key)
    if dim is None:
        return tuple(shape)
    return tuple(s // n if i == dim else s for i, s in enumerate(shape))


# ----------------------------------------------------------------------------- the source folder

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
    """A validated Meta folder: params.json, consolidated.NN.pth shards, tokenizer.model
    (sentencepiece for llama2, tiktoken's BPE file for Llama 3)."""

    format = "meta"

    path: Path
    params: dict
    params_bytes: bytes
    args: ModelArgs
    shards: list[Path]
    tokenizer: Path
    tok: object  # the tokenizer, loaded (once: the vocab is checked with it, and training takes it)
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
            raise SlowftError(f"{folder / 'tokenizer.model'}: missing; expected the tokenizer.model of this model")

        tok = load_tokenizer(tokenizer.parent)
        numbered = sorted((int(m[1]), p) for p in folder.iterdir() if (m := _SHARD.match(p.name)))
        if not numbered:
            raise SlowftError(f"{folder}: no consolidated.00.pth; expected Meta's checkpoint shards consolidated.NN.pth")
        for want, (got, p) in enumerate(numbered):
            if got != want:
                raise SlowftError(f"{folder / f'consolidated.{want:02d}.pth'}: missing; found {len(numbered)} shards numbered up to {numbered[-1][0]:02d}")
        shards = [p for _, p in numbered]
        src = cls(folder, params, raw, args, shards, tokenizer, tok, torch.bfloat16, [])
        src._check_shards()
        if tok.n_words > src.args.vocab_size:
            raise SlowftError(f"{tokenizer}: has {tok.n_words} tokens but the model's embedding has {src.args.vocab_size}; expected this model's tokenizer")
        return src

    def _check_shards(self) -> None:
        """Reads each shard's index (not its data) and checks keys and shapes against params.json."""
        n = len(self.shards)
        first = _load_shard(self.shards[0])
        wq = first.get("layers.0.attention.wq.weight")
        if wq is None or "tok_embeddings.weight" not in first:
            raise SlowftError(f"{self.shards[0]}: expected llama2 keys (tok_embeddings.weight, layers.0.attention.wq.weight, ...)")
        self.args.tie_embeddings = "output.weight" not in first  # Llama 3.2 1B/3B: the embedding is the head too
        rows = self.args.n_heads * self.args.head_dim
        if wq.shape[0] * n != rows:
            raise SlowftError(
                f"{self.shards[0]}: layers.0.attention.wq.weight has {wq.shape[0]} rows, but params.json "
                f"(dim {self.args.dim}) split over the {n} shard(s) found needs {rows / n:g}; "
                "expected params.json and every consolidated.NN.pth of one checkpoint"
            )
        if self.args.vocab_size <= 0:
            self.args.vocab_size = first["tok_embeddings.weight"].shape[0]
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

    def record(self) -> dict:
        """What the work dir remembers of this source (meta.json), for an export in its image."""
        return {"format": self.format, "path": str(self.path), "fingerprint": self.fingerprint(), "shards": len(self.shards),
                "dtype": dtype_name(self.dtype), "key_order": self.key_order, "unit_order": self.units_in_file_order()}

    def kept_files(self) -> dict[str, Path]:
        """The small files the work dir keeps for export and generation."""
        return {"params.json": self.path / "params.json", "tokenizer.model": self.tokenizer}

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
    with export_folder(out_dir) as tmp:
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


# ----------------------------------------------------------------------------- export of any source

def key_order(args: ModelArgs) -> list[str]:
    """The order of keys in Meta's consolidated.NN.pth files (no output.weight when tied)."""
    keys = ["tok_embeddings.weight", "norm.weight"] + ([] if args.tie_embeddings else ["output.weight"])
    return keys + [f"layers.{i}.{k}" for i in range(args.n_layers) for k in BLOCK_PARAMS]


def params_of(args: ModelArgs) -> dict:
    """A params.json that Meta's code builds this model from, for a source in another format: the
    FFN width comes back through multiple_of (and ffn_dim_multiplier where the width is below
    Meta's 8/3 dim)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    base = int(2 * (4 * args.dim) / 3)
    want = args.hidden_dim
    for multiplier, multiple_of in ((None, 256), (None, want), ((want + 0.5) / base, 1)):
        if ModelArgs(dim=args.dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim == want:
            params.update({"multiple_of": multiple_of, **({"ffn_dim_multiplier": multiplier} if multiplier else {})})
            break
    if args.rope_scaling:  # Meta's keys where Meta's code has them, the rest where they differ from its defaults
        params["use_scaled_rope"] = True
        params.update({f"rope_scaling_{k}": v for k, v in args.rope_scaling.items() if k == "factor" or v != LLAMA3_ROPE_SCALING[k]})
    return params


def write(out_dir: Path, units, args: ModelArgs, extras: dict, kept: Path, source: dict, dtype: torch.dtype,
          shards: int | None = None, progress=None, **_) -> None:
    """Writes the model in Meta's format: in the image of a Meta source (its shards, key order and
    params.json), or from another format's with a params.json made from the model's shape."""
    kept = Path(kept)
    if not (kept / "tokenizer.model").exists():
        raise SlowftError(f"{out_dir}: Meta's format needs a tokenizer.model, and this model's tokenizer is "
                          "tokenizer.json only; expected --export-format hf")
    if source.get("format", "meta") == "meta":
        keys, params = source["key_order"], (kept / "params.json").read_bytes()
        shards = shards or source["shards"]
    else:
        keys, params, extras = key_order(args), json.dumps(params_of(args), indent=2).encode(), {}
        shards = shards or 1
    shapes = expected_shapes(args, with_extras=False)
    shapes.update({k: tuple(v.shape) for k, v in extras.items()})
    write_meta_checkpoint(out_dir, units, shapes, keys, extras, params, kept / "tokenizer.model", shards, dtype, progress)


source_class = MetaSource
