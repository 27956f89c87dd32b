"""What every checkpoint format shares: the tensors a llama model has (under Meta's names, which
the units and ``model.py`` use too), their shapes, which unit each belongs to, and the import of
any format's source into the work dir's units.

A format (``slowft.formats``) only maps its own names and files onto these.
"""
from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from . import faults
from .atomic import fsync_dir, replace_dir, restore_dir, temp_name
from .errors import SlowftError
from .model import ModelArgs
from .progress import progress as progress_of
from .store import FORMAT, Store
from .units import EMBEDDING, HEAD, LAYER, is_layer, layer

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


def dtype_of(dtype, flag: str = "dtype") -> torch.dtype:
    """A torch.dtype from itself or its name ("bfloat16"); one slowft does not store is refused."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise SlowftError(f"{flag} {dtype}: expected one of {', '.join(DTYPE_NAMES)} (a name or a torch.dtype)")


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
    """Full (unsharded) shape of every key of a checkpoint, in Meta's order and names. A tied
    model has no ``output.weight``: the embedding is the output projection too."""
    d, hd, v = args.dim, args.head_dim, args.vocab_size
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    if args.tie_embeddings:
        del shapes["output.weight"]
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


def unit_params(args: ModelArgs) -> dict[str, int]:
    """unit -> the count of its weights' parameters."""
    return {unit: sum(torch.Size(s).numel() for s in shapes.values()) for unit, shapes in unit_shapes(args).items()}


def n_params(args: ModelArgs) -> int:
    """The trained parameters' count (rope.freqs aside; a tied matrix once)."""
    return sum(torch.Size(s).numel() for s in expected_shapes(args, with_extras=False).values())


# ----------------------------------------------------------------------------- export folders

_EXPORT_FILE = re.compile(r"^(params\.json|tokenizer\.model|consolidated\.\d+\.pth|config\.json|generation_config\.json|"
                          r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
                          r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                          r"adapter_model\.safetensors|adapter_config\.json|\.DS_Store)$")


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


@contextlib.contextmanager
def export_folder(out_dir: Path):
    """A temp folder beside ``out_dir`` to write an export into: made durable and put in
    ``out_dir``'s place whole when the block ends, removed if it fails, so an export is complete
    or absent (an earlier export there is replaced; a folder of the user's, refused)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_dir(out_dir)  # after an export that was killed
    check_export_dir(out_dir)
    tmp = temp_name(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- import into the store

def import_model(src, store: Store, storage_dtype: torch.dtype, progress: bool = True, run: dict | None = None) -> None:
    """Reshards ``src`` (any format's source) into the store's units (version 0); continues an
    interrupted import. ``run`` (a training run's settings) is recorded first, so a run killed
    during its import is still recognised as that run."""
    meta = store.read_json("meta.json")
    if meta is None:
        meta = {"format": FORMAT, "source": src.record(), "args": asdict(src.args),
                "storage_dtype": dtype_name(storage_dtype), "imported": False, "run": run}
        store.write_json("meta.json", meta)
    elif run is not None and meta.get("run") is None:
        meta["run"] = run
        store.write_json("meta.json", meta)
    if meta["imported"]:
        return
    unit_size = {unit: n * storage_dtype.itemsize for unit, n in unit_params(src.args).items()}
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
    for name, path in src.kept_files().items():
        store.copy_in(path, name)
    store.write_journal({"step": 0, "sweep": None, "versions": dict.fromkeys(unit_size, 0)})
    meta["imported"] = True
    store.write_json("meta.json", meta)
