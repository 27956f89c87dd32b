"""Hugging Face's llama layout (``LlamaForCausalLM``): config.json, safetensors shards with their
index, and the tokenizer's files.

Names map one to one onto Meta's. The difference is in q and k: Hugging Face's conversion
permuted each head's rows so that rotary embeddings rotate halves (``rotate_half``) instead of
Meta's interleaved pairs; import undoes it (k with ``num_key_value_heads``), export redoes it, both
exact. A tied model (``tie_word_embeddings``, Llama 3.2 1B/3B) has no ``lm_head.weight``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import fsync_file, write_bytes_atomic
from ..checkpoint import DTYPE_NAMES, dtype_name, export_folder, expected_shapes, meta_key, unit_shapes
from ..errors import SlowftError
from ..model import ModelArgs
from ..store import empty_packed
from ..tokenizer import load_tokenizer
from ..units import EMBEDDING, HEAD, is_state, layers

ARCHITECTURE = "LlamaForCausalLM"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's default shard size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_key(key: str) -> str:
    """Meta's name of a tensor -> Hugging Face's."""
    if key in _TOP:
        return _TOP[key]
    _, i, rest = key.split(".", 2)
    return f"model.layers.{i}.{_BLOCK[rest]}"


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's q/k rows -> Hugging Face's: each head's interleaved pairs become two halves."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def heads_of(key: str, args: ModelArgs) -> int | None:
    """How many heads a tensor's rows are permuted by (None: not permuted)."""
    return args.n_heads if key.endswith("attention.wq.weight") else args.kv_heads if key.endswith("attention.wk.weight") else None


# ----------------------------------------------------------------------------- config.json

def args_of(config: dict) -> ModelArgs:
    """ModelArgs from a config.json; ValueError naming the first value that does not fit."""
    def positive(k):
        v = config.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"'{k}' must be a positive integer")
        return v

    dim, heads = positive("hidden_size"), positive("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if dim % heads or heads % kv or dim // heads % 2 or config.get("head_dim", dim // heads) != dim // heads:
        raise ValueError("hidden_size must divide into num_attention_heads heads of even size (head_dim), "
                         "num_attention_heads into num_key_value_heads groups")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise ValueError("biases or an activation other than silu are not llama's")
    scaling = config.get("rope_scaling")
    if scaling is not None and (scaling.get("rope_type", scaling.get("type")) != "llama3"):
        raise ValueError(f"rope_scaling of type {scaling.get('rope_type', scaling.get('type'))!r}; expected none or 'llama3'")
    return ModelArgs(
        dim=dim, n_layers=positive("num_hidden_layers"), n_heads=heads, n_kv_heads=kv, vocab_size=positive("vocab_size"),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(config.get("rope_theta", 10000.0)),
        max_seq_len=int(config.get("max_position_embeddings", 4096)), ffn_hidden=positive("intermediate_size"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling={k: float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings")} if scaling else None,
    )


def config_of(args: ModelArgs, dtype: torch.dtype, bos_id: int | None, eos_id: int | None) -> dict:
    """The config.json of a model that came from another format."""
    config = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype_name(dtype), "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    return config


# ----------------------------------------------------------------------------- the source folder

def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SlowftError(f"{path}: unreadable ({str(e).splitlines()[0][:80]}); expected {what}") from None
    if not isinstance(data, dict):
        raise SlowftError(f"{path}: not a JSON object; expected {what}")
    return data


class HFSource:
    """A validated Hugging Face llama folder."""

    format = "hf"

    def __init__(self, path: Path, config: dict, config_bytes: bytes, args: ModelArgs, files: dict[str, Path]):
        self.path, self.config, self.config_bytes, self.args = path, config, config_bytes, args
        self.files = files  # Hugging Face name of each tensor -> its safetensors file
        self.tok = load_tokenizer(path)  # (loaded once: the vocab is checked with it, and training takes it)
        self.dtype = torch.bfloat16

    @classmethod
    def open(cls, path) -> "HFSource":
        folder = Path(path).expanduser().resolve()
        config_path = folder / "config.json"
        config = _read_json(config_path, "a Hugging Face config.json")
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        if arch != ARCHITECTURE:
            raise SlowftError(f"{config_path}: architecture {arch}; expected {ARCHITECTURE} (llama2, CodeLlama, Llama 3.x)")
        try:
            args = args_of(config)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SlowftError(f"{config_path}: malformed ({e}); expected a llama config.json") from None
        src = cls(folder, config, config_path.read_bytes(), args, cls._weight_files(folder))
        if src.tok.n_words > args.vocab_size:
            raise SlowftError(f"{src.tok.files[0]}: has {src.tok.n_words} tokens but config.json's vocab_size is "
                              f"{args.vocab_size}; expected this model's tokenizer")
        src._check_tensors()
        return src

    @staticmethod
    def _weight_files(folder: Path) -> dict[str, Path]:
        index = folder / INDEX
        if index.exists():
            weight_map = _read_json(index, "a safetensors index with a weight_map").get("weight_map")
            if not isinstance(weight_map, dict):
                raise SlowftError(f"{index}: no weight_map; expected a safetensors index")
            files = {k: folder / v for k, v in weight_map.items()}
            for f in dict.fromkeys(files.values()):
                if not f.is_file():
                    raise SlowftError(f"{f}: missing; {INDEX} names it")
            return files
        single = folder / "model.safetensors"
        if not single.is_file():
            raise SlowftError(f"{single}: missing, and no {INDEX}; expected the model's safetensors")
        with _opened(single) as f:
            return dict.fromkeys(f.keys(), single)

    def _check_tensors(self) -> None:
        """Every tensor the config implies is there, with its shape (headers only, no data read)."""
        want = {hf_key(k): s for k, s in expected_shapes(self.args, with_extras=False).items()}
        if self.args.tie_embeddings:  # a tied checkpoint may still carry lm_head.weight; it is the embedding
            self.files.pop("lm_head.weight", None)
        by_file: dict[Path, list[str]] = {}
        for name in want:
            if name not in self.files:
                raise SlowftError(f"{self.path}: no tensor {name}; expected a llama checkpoint with "
                                  f"{self.args.n_layers} layers as config.json says")
            by_file.setdefault(self.files[name], []).append(name)
        for path, names in by_file.items():
            with _opened(path) as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != want[name]:
                        raise SlowftError(f"{path}: {name} has shape {list(shape)}, expected {list(want[name])} "
                                          "from config.json; expected the config and tensors of one model")
                    self.dtype = _dtype(f, name)
        extra = sorted(set(self.files) - set(want))
        if extra:
            raise SlowftError(f"{self.files[extra[0]]}: unexpected tensor {extra[0]} for a llama model")

    def fingerprint(self) -> str:
        h = hashlib.sha256(str(self.path).encode() + self.config_bytes)
        for p in sorted(set(self.files.values())) + list(self.kept_files().values()):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def units_in_file_order(self) -> list[str]:
        return [EMBEDDING, *layers(self.args.n_layers), HEAD]

    def record(self) -> dict:
        return {"format": self.format, "path": str(self.path), "fingerprint": self.fingerprint(),
                "shards": len(set(self.files.values())), "dtype": dtype_name(self.dtype), "unit_order": self.units_in_file_order()}

    def kept_files(self) -> dict[str, Path]:
        """config.json, generation_config.json and the tokenizer's files; Meta's tokenizer.model
        from ``original/`` where the folder has one (Llama 3's), for an export in Meta's format."""
        kept = {name: self.path / name for name in ("config.json", "generation_config.json", *TOKENIZER_FILES)
                if (self.path / name).is_file()}
        if "tokenizer.model" not in kept and (self.path / "original" / "tokenizer.model").is_file():
            kept["tokenizer.model"] = self.path / "original" / "tokenizer.model"
        return kept

    def read_units(self, storage_dtype: torch.dtype, skip=frozenset()):
        """Yields (unit, tensors): each tensor read from its file, unpermuted, cast into one buffer."""
        shapes = unit_shapes(self.args)
        for unit in self.units_in_file_order():
            if unit in skip:
                continue
            packed = empty_packed(shapes[unit], storage_dtype)
            for name in shapes[unit]:
                key = meta_key(unit, name)
                with _opened(self.files[hf_key(key)]) as f:
                    t = f.get_tensor(hf_key(key))
                heads = heads_of(key, self.args)
                packed[name].copy_(unpermute(t, heads) if heads else t)
                del t
            yield unit, packed
            del packed

    def read_extras(self) -> dict[str, torch.Tensor]:
        return {}


def _dtype(f, name: str) -> torch.dtype:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    got = f.get_slice(name).get_dtype()
    if got not in names:
        raise SlowftError(f"{name}: stored as {got}; expected float32, bfloat16 or float16 weights")
    return DTYPE_NAMES[names[got]]


class _opened:
    """safe_open with its errors (a truncated file, a header that lies) as one line naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.f = safe_open(str(self.path), framework="pt")
            return self.f.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise SlowftError(f"{self.path}: unreadable safetensors ({str(e).splitlines()[0][:100]}); "
                              "expected a complete safetensors file") from None

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


# ----------------------------------------------------------------------------- export

def shard_plan(tensors: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensors (name, bytes) in order -> shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in tensors:
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write(out_dir: Path, units, args: ModelArgs, extras: dict, kept: Path, source: dict, dtype: torch.dtype,
          max_shard_size: int | None = None, progress=None, **_) -> None:
    """Writes the model as a Hugging Face folder, atomically (complete or absent): safetensors
    shards of at most ``max_shard_size`` bytes, written one by one as their tensors arrive (so
    only one shard is in RAM), with the index, config.json, generation_config.json and the tokenizer."""
    out_dir, kept = Path(out_dir).resolve(), Path(kept)
    shapes = unit_shapes(args)
    sizes = [(hf_key(meta_key(u, n)), torch.Size(shape).numel() * dtype.itemsize)  # in the order units arrive
             for u in source["unit_order"] for n, shape in shapes[u].items()]
    plan = shard_plan(sizes, max_shard_size or MAX_SHARD_BYTES)
    names = ["model.safetensors"] if len(plan) == 1 else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    with export_folder(out_dir) as tmp:
        shard_of = {name: k for k, shard in enumerate(plan) for name in shard}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        for unit, tensors in units:
            for n, t in tensors.items():
                if is_state(n):
                    continue
                key = meta_key(unit, n)
                heads = heads_of(key, args)
                k = shard_of[hf_key(key)]
                pending.setdefault(k, {})[hf_key(key)] = (permute(t, heads) if heads else t).to(dtype).contiguous()
                if len(pending[k]) == len(plan[k]):
                    _save(tmp / names[k], pending.pop(k), plan[k])
            if progress:
                progress(unit, sum(t.numel() * t.element_size() for t in tensors.values()))
        if pending:
            raise SlowftError(f"{out_dir}: export is missing {sorted(pending)[0]}; expected every tensor of the model")
        if len(plan) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                     "weight_map": {name: names[k] for name, k in sorted(shard_of.items())}}
            write_bytes_atomic(tmp / INDEX, json.dumps(index, indent=2).encode())
        _write_side_files(tmp, args, kept, dtype)


def _save(path: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    save_file({name: tensors[name] for name in order}, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        fsync_file(f.fileno())


def _write_side_files(tmp: Path, args: ModelArgs, kept: Path, dtype: torch.dtype) -> None:
    """config.json (the source's, with the export's dtype; or one made from the model's shape),
    generation_config.json and the tokenizer's files."""
    tok = load_tokenizer(kept)
    if (kept / "config.json").exists():
        config = json.loads((kept / "config.json").read_bytes())
        config["torch_dtype" if "dtype" not in config else "dtype"] = dtype_name(dtype)
    else:
        config = config_of(args, dtype, tok.bos_id, tok.eos_id)
    write_bytes_atomic(tmp / "config.json", json.dumps(config, indent=2).encode())
    if (kept / "generation_config.json").exists():
        write_bytes_atomic(tmp / "generation_config.json", (kept / "generation_config.json").read_bytes())
    else:
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.stop_ids) if len(tok.stop_ids) > 1 else tok.eos_id}
        write_bytes_atomic(tmp / "generation_config.json", json.dumps(generation, indent=2).encode())
    for name in TOKENIZER_FILES:
        if (kept / name).exists():
            write_bytes_atomic(tmp / name, (kept / name).read_bytes())
    if tok.family == "llama2" and not (kept / "tokenizer_config.json").exists():  # Meta's sentencepiece file alone
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": True, "add_eos_token": False}
        write_bytes_atomic(tmp / "tokenizer_config.json", json.dumps(config, indent=2).encode())


source_class = HFSource
