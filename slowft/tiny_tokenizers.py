"""Tiny tokenizers in the real file formats of the llama families, for tiny test models.

``write_tiktoken_model`` writes a Llama 3 ``tokenizer.model`` (tiktoken ranks, as Meta ships it),
``write_hf_tokenizer`` a ``tokenizer.json`` + ``tokenizer_config.json`` laid out as Hugging
Face's Llama 3 (byte-level BPE, Meta's 256 special tokens after it) or Llama 2 (sentencepiece-like
BPE with byte fallback; <unk>, <s>, </s> at 0, 1, 2). Both BPEs are learned from the given texts
in milliseconds; for the same texts and size the two Llama 3 files encode alike, as Meta's and
Hugging Face's Llama 3 tokenizers do.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from .bpe import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS

TEST_DATA = Path(__file__).resolve().parent.parent / "test_data"
LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")


def prose(folder: Path = TEST_DATA) -> list[str]:
    """The texts of ``folder``'s .txt files (the project's test prose by default)."""
    return [p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.txt"))]


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte, in which byte-level tokenizer.json files spell
    their tokens: printable Latin-1 bytes as themselves, the others as chr(256 + k)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return chars


def _llama3_pre_tokenizer():
    """Llama 3's tokenizer.json: Meta's split pattern, then bytes as GPT-2's characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def learn_byte_ranks(texts: list[str], n_base: int) -> dict[bytes, int]:
    """Byte-level BPE ranks learned from ``texts``: the 256 single bytes first (in byte order), then
    each merge's token in the order learned, up to ``n_base`` tokens (fewer if the texts run out)."""
    if n_base < 257:
        raise ValueError(f"n_base {n_base}: expected at least 257 (the 256 bytes and a merge)")
    hf = Tokenizer(BPE())
    hf.pre_tokenizer = _llama3_pre_tokenizer()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=n_base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    byte_of = {c: b for b, c in enumerate(byte_chars())}
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in json.loads(hf.to_str())["model"]["merges"]:
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    return ranks


def write_tiktoken_model(path: Path, texts: list[str], n_base: int = 512) -> int:
    """A Llama 3 tiktoken tokenizer.model (``base64-token rank`` a line) learned from ``texts``;
    returns the vocabulary with Meta's 256 special tokens after the ranks."""
    ranks = learn_byte_ranks(texts, n_base)
    Path(path).write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
    return len(ranks) + len(LLAMA3_SPECIAL_TOKENS)


def _llama3_tokenizer(texts: list[str], n_base: int) -> Tokenizer:
    """Hugging Face's Llama 3 layout of ``learn_byte_ranks``: the vocabulary is the ranks, and the
    merges every split of a token into two tokens, by the merged token's rank (as transformers
    converts Meta's file), so it encodes as tiktoken does."""
    ranks = learn_byte_ranks(texts, n_base)
    chars = byte_chars()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    splits = sorted((rank, ranks[t[:i]], ranks[t[i:]], t[:i], t[i:])
                    for t, rank in ranks.items() for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    hf = Tokenizer(BPE({spell(t): r for t, r in ranks.items()}, [(spell(a), spell(b)) for *_, a, b in splits], ignore_merges=True))
    hf.pre_tokenizer = _llama3_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", len(ranks))])
    return hf


def _llama2_tokenizer(texts: list[str], n_base: int) -> Tokenizer:
    """Hugging Face's Llama 2 layout: <unk>, <s>, </s>, the 256 byte-fallback tokens <0x00>..,
    then BPE pieces that start at a "▁" (a space); learned line by line, so a newline is never a
    piece and goes as a byte, as in Meta's llama2 tokenizer."""
    if n_base < 260:
        raise ValueError(f"n_base {n_base}: expected at least 260 (3 special and 256 byte tokens, and a piece)")
    trained = Tokenizer(BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=n_base - 259, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate([*LLAMA2_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))])}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    hf = Tokenizer(BPE(vocab, [tuple(m) for m in model["merges"]], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer, hf.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA2_SPECIALS])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return hf


def write_hf_tokenizer(folder: Path, texts: list[str], family: str = "llama3", chat_template: str | None = None,
                       n_base: int = 512) -> int:
    """``folder``/tokenizer.json learned from ``texts`` in the Hugging Face layout of ``family``
    ("llama3": ``n_base`` byte-level tokens, then Meta's 256 special ones; "llama2": ``n_base``
    tokens in all) and tokenizer_config.json naming BOS, EOS and ``chat_template`` if given;
    returns the vocabulary size."""
    if family not in ("llama2", "llama3"):
        raise ValueError(f"family {family!r}: expected 'llama2' or 'llama3'")
    hf = _llama3_tokenizer(texts, n_base) if family == "llama3" else _llama2_tokenizer(texts, n_base)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if family == "llama3" else ("<s>", "</s>")
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": True, **({"chat_template": chat_template} if chat_template else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return hf.get_vocab_size(with_added_tokens=True)
