"""Byte-level BPE tokenizers, behind slowft.tokenizer's interface: Llama 3's (tiktoken) and
Hugging Face folders' (tokenizer.json).

Meta's Llama 3 ``tokenizer.model`` is a tiktoken BPE file (``base64-token rank`` a line); the
split pattern and the 256 special tokens after the ranks are not in it but in Meta's code,
copied here exactly. A ``tokenizer.json`` is run by the ``tokenizers`` library, as transformers
runs it. Plain text never encodes to a special token (a user's "<|eot_id|>" stays text); a
rendered chat template, whose markers are those tokens, goes through ``encode_with_specials``.
"""
from __future__ import annotations

import base64
import functools
import re
from pathlib import Path

import tiktoken
import tokenizers

from .errors import SlowftError
from .tokenizer import BaseTokenizer, TokenizerConfig

# Meta's llama3 tokenizer.py: pat_str, and special_tokens at ids n_base + i
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>", *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
)
MAX_ENCODE_CHARS = 400_000  # Meta's limits: tiktoken fails on longer texts and on longer runs
MAX_RUN_CHARS = 25_000  # of whitespace or of non-whitespace (openai/tiktoken issue 195)
LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file's ranks. Read here, not by tiktoken's load_tiktoken_bpe: that keeps a
    copy of every file it reads under /tmp keyed by the file's path, so a tokenizer.model
    replaced at the same path would be read stale."""
    bad = f"{path}: not a readable sentencepiece model, nor a tiktoken BPE file"
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise SlowftError(f"{bad} ({e.strerror}); expected Meta's tokenizer.model") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise SlowftError(f"{bad} (line {n} is not 'base64-token rank'); expected Meta's tokenizer.model") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise SlowftError(f"{path}: tiktoken ranks are not 0..n-1 over distinct tokens that include all 256 bytes; "
                          "expected Meta's Llama 3 tokenizer.model")
    return ranks


def meta_pieces(text: str):
    """``text`` cut as Meta's encode cuts it: 400,000 characters at a time, and within that a run
    of whitespace or of non-whitespace longer than 25,000 characters every 25,000."""
    for at in range(0, len(text), MAX_ENCODE_CHARS):
        chunk, start = text[at : at + MAX_ENCODE_CHARS], 0
        for run in LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


class Llama3Tokenizer(BaseTokenizer):
    """Meta's Llama 3 tokenizer.model, built as Meta's llama3 tokenizer.py builds it."""

    def __init__(self, path, config: TokenizerConfig = TokenizerConfig()):
        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        self.special = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special)
        self.n_words = self.model.n_vocab
        self._set_specials(config, "<|begin_of_text|>", "<|end_of_text|>")

    def token_id(self, text: str) -> int | None:
        return self.special.get(text)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._wrap(self._encode(text, set()), bos, eos)

    def encode_with_specials(self, text: str) -> list[int]:
        return self._encode(text, "all")

    def _encode(self, text: str, allowed_special) -> list[int]:
        return [t for piece in meta_pieces(text)
                for t in self.model.encode(piece, allowed_special=allowed_special, disallowed_special=())]

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


class HFTokenizer(BaseTokenizer):
    """A Hugging Face tokenizer.json; BOS and EOS are added here (not by its post-processor), as
    for every kind."""

    def __init__(self, path, config: TokenizerConfig = TokenizerConfig()):
        self.path = Path(path)
        try:
            self.hf = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for any unreadable file
            raise SlowftError(f"{self.path}: not a readable Hugging Face tokenizer.json ({str(e).splitlines()[0][:80]}); "
                              "expected this model's tokenizer.json") from None
        self.hf.encode_special_tokens = True  # plain text: special tokens' strings in it stay text
        self.added = {token.content: i for i, token in self.hf.get_added_tokens_decoder().items()}
        self.n_words = self.hf.get_vocab_size(with_added_tokens=True)
        self._set_specials(config, self._first("<|begin_of_text|>", "<s>"), self._first("<|end_of_text|>", "</s>"))

    def _first(self, *tokens: str) -> str | None:
        return next((t for t in tokens if t in self.added), None)

    def token_id(self, text: str) -> int | None:
        return self.added.get(text)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._wrap(self.hf.encode(text, add_special_tokens=False).ids, bos, eos)

    @functools.cached_property
    def _with_specials(self) -> tokenizers.Tokenizer:
        """A second copy that matches special tokens' strings (a setting of the whole tokenizer)."""
        hf = tokenizers.Tokenizer.from_str(self.hf.to_str())
        hf.encode_special_tokens = False
        return hf

    def encode_with_specials(self, text: str) -> list[int]:
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)
