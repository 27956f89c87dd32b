"""Tiny random llama2 models in Meta's exact format, for the demo and the tests.

``python -m slowft.tiny OUT [--dim --layers --heads --kv-heads --shards --vocab --ffn-mult ...]``
writes params.json, consolidated.NN.pth (bf16, Meta's keys, order and sharding) and a
sentencepiece tokenizer.model trained on the project's ``test_data/`` text (byte fallback; unk 0,
bos 1, eos 2, as llama2's).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import sentencepiece as spm
import torch

from .atomic import temp_name
from .cli import ArgumentParser, run
from .data import read_text, text_files
from .errors import SlowftError
from .checkpoint import DTYPE_NAMES, expected_shapes, unit_of
from .formats import hf
from .formats.meta import check_params, key_order, write_meta_checkpoint
from .model import ModelArgs, Transformer, rope_frequencies
from .tokenizer import load_tokenizer
from .units import forward_order

TEST_DATA = Path(__file__).resolve().parent.parent / "test_data"


def train_tokenizer(corpus: list[Path], vocab_size: int, out: Path) -> int:
    """Trains a llama2-style BPE sentencepiece model; returns its vocab size."""
    files = [f for f in text_files(corpus) if f.suffix != ".jsonl"]  # the prose (test_data's chat examples aside)
    lines = [line for f in files for line in read_text(f).splitlines() if line.strip()]
    buf = io.BytesIO()
    if vocab_size < 260:  # byte fallback's 256 pieces, the three special ones and one more
        raise SlowftError(f"--vocab {vocab_size}: expected at least 260 (byte fallback alone takes 259)")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    out.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(out)).vocab_size()


def make_tiny(out: Path, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
              shards: int = 1, vocab: int = 512, ffn_mult: float | None = None, multiple_of: int = 32,
              rope_theta: float | None = None, seed: int = 0, dtype: str = "bfloat16", params_vocab: int | None = None,
              corpus: list[Path] | None = None) -> Path:
    """Writes a random model; returns ``out``. ``params_vocab`` writes that vocab_size (>= the
    tokenizer's, as CodeLlama's 32016) into params.json instead of Meta's -1."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SlowftError(f"{out}: folder exists and is not empty; expected a new folder for the tiny model")
    params = {"dim": dim, "multiple_of": multiple_of, "n_heads": heads, "n_layers": layers, "norm_eps": 1e-05,
              "vocab_size": params_vocab or -1}
    if kv_heads and kv_heads != heads:
        params["n_kv_heads"] = kv_heads
    if ffn_mult is not None:
        params["ffn_dim_multiplier"] = ffn_mult
    if rope_theta is not None:
        params["rope_theta"] = rope_theta
    try:
        check_params(params)  # a model its own loader would refuse is not written
    except ValueError as e:
        raise SlowftError(f"tiny model: {e}; expected a shape llama2 allows") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_path = temp_name(out.with_name(out.name + ".tokenizer.model"))
    try:
        n_words = train_tokenizer(corpus or [TEST_DATA], vocab, tok_path)
        if params_vocab and params_vocab < n_words:
            raise SlowftError(f"--vocab {params_vocab}: below the tokenizer's {n_words} tokens")
        model = random_model(ModelArgs.from_params(params, vocab_size=n_words), seed)
        write_model(out, params, model, tok_path, shards, dtype)
    finally:
        tok_path.unlink(missing_ok=True)
    return out


def random_model(args: ModelArgs, seed: int) -> Transformer:
    """Norms at 1, matrices N(0, 0.02), drawn from ``seed``."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
    return model


def units_of(model: Transformer) -> dict[str, dict[str, torch.Tensor]]:
    """An in-RAM model's tensors by unit (a tied output projection once, as the embedding)."""
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key in expected_shapes(model.args, with_extras=False):
        unit, name = unit_of(key)
        units.setdefault(unit, {})[name] = model.state_dict()[key]
    return units


def write_model(out: Path, params: dict, model: Transformer, tokenizer: Path, shards: int = 1, dtype: str = "bfloat16") -> Path:
    """An in-RAM model's weights as a Meta llama2 folder: params.json, consolidated.NN.pth (Meta's
    keys, order and sharding) and the tokenizer (e.g. a model pretrained for a benchmark)."""
    args = model.args
    units = units_of(model)
    keys = key_order(args) + ["rope.freqs"]
    order = list(dict.fromkeys(unit_of(k)[0] for k in keys if unit_of(k)[0]))
    write_meta_checkpoint(out, ((u, units[u]) for u in order), expected_shapes(args), keys,
                          {"rope.freqs": rope_frequencies(args.head_dim, args.rope_theta).to(DTYPE_NAMES[dtype])},
                          json.dumps(params).encode(), tokenizer, shards, DTYPE_NAMES[dtype])
    return out


def make_tiny_hf(out: Path, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int | None = None, vocab: int = 512,
                 hidden: int = 160, tied: bool = False, rope_scaling: dict | None = None, rope_theta: float = 10000.0,
                 seed: int = 0, dtype: str = "bfloat16", max_shard_size: int | None = None,
                 tokenizer: dict[str, bytes] | None = None) -> Path:
    """Writes a random model as a Hugging Face folder (config.json, safetensors with q and k
    permuted as Hugging Face's conversion does, the tokenizer); returns ``out``. ``tokenizer``:
    its files by name (default: a sentencepiece tokenizer.model trained on test_data/, llama2's)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SlowftError(f"{out}: folder exists and is not empty; expected a new folder for the tiny model")
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = temp_name(out.with_name(out.name + ".tokenizer"))
    kept.mkdir()
    try:
        if tokenizer is None:
            train_tokenizer([TEST_DATA], vocab, kept / "tokenizer.model")
        for name, data in (tokenizer or {}).items():
            (kept / name).write_bytes(data)
        args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads or heads, ffn_hidden=hidden,
                         vocab_size=load_tokenizer(kept).n_words, rope_theta=rope_theta, rope_scaling=rope_scaling,
                         tie_embeddings=tied, max_seq_len=2048)
        units = units_of(random_model(args, seed))
        order = forward_order(layers)
        hf.write(out, ((u, units[u]) for u in order), args, {}, kept, {"format": "hf", "unit_order": order},
                 DTYPE_NAMES[dtype], max_shard_size=max_shard_size)
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    return out


def main() -> int:
    ap = ArgumentParser(prog="python -m slowft.tiny", description="Write a tiny random llama2 model in Meta's format.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--ffn-mult", type=float, default=None)
    ap.add_argument("--multiple-of", type=int, default=32)
    ap.add_argument("--rope-theta", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bfloat16")
    ap.add_argument("--corpus", type=Path, nargs="+", default=None, help="text to train the tokenizer on (default: test_data/)")
    a = ap.parse_args()
    make_tiny(a.out, a.dim, a.layers, a.heads, a.kv_heads, a.shards, a.vocab, a.ffn_mult, a.multiple_of,
              a.rope_theta, a.seed, a.dtype, corpus=a.corpus)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run(main)
