"""Checkpoint formats, one module each behind one small interface.

A format module has a source class (``open(path)``; ``args``, ``dtype``, ``fingerprint()``,
``record()``, ``kept_files()``, ``read_units()``, ``read_extras()``) and ``write(out_dir, units,
args, extras, kept, source, dtype, ...)``. A new format is one module and one line in FORMATS.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SlowftError
from . import hf, meta

FORMATS = {"meta": meta, "hf": hf}


def detect(folder: Path) -> str:
    """Which format a model folder is in, from the files that only that format has."""
    if (folder / "params.json").exists():
        return "meta"
    if (folder / "config.json").exists():
        return "hf"
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        raise SlowftError(f"{folder / 'config.json'}: missing; expected a Hugging Face folder's config.json beside its weights")
    raise SlowftError(f"{folder / 'params.json'}: missing; expected Meta's params.json (dim, n_layers, n_heads, ...) "
                      "or a Hugging Face folder (config.json, model.safetensors)")


def open_source(path):
    """The model folder at ``path``, validated, in whichever format it is."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SlowftError(f"{folder}: no such folder; expected a model folder (Meta's params.json and consolidated.NN.pth, "
                          "or Hugging Face's config.json and model.safetensors)")
    return FORMATS[detect(folder.resolve())].source_class.open(folder)


def writer(name: str, flag: str = "--export-format"):
    if name not in FORMATS:
        raise SlowftError(f"{flag} {name}: expected one of {', '.join(FORMATS)}")
    return FORMATS[name].write
