"""Meta's sentencepiece tokenizer, with llama2's BOS convention."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .errors import SlowftError


PIECE_CHARS = 1 << 20  # characters of a long text encoded at a time (~1 MB)


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise SlowftError(f"{self.path}: not a readable sentencepiece model ({str(e).splitlines()[0][:80]}); expected Meta's tokenizer.model") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def encode_long(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """``encode`` for a text of any length, as int32: sentencepiece takes ~45 bytes per byte of
        text while it encodes, so a long text goes about a MB at a time, cut after a newline and
        each piece after the first encoded behind a newline that is then dropped (llama's pieces
        never hold a newline, so the tokens are those of the whole text; checked on this
        tokenizer first, else the text goes whole)."""
        if len(text) <= PIECE_CHARS or not self._splits_at_newlines:
            return np.asarray(self.encode(text, bos, eos), dtype=np.int32)
        parts, start = [[self.bos_id]] if bos else [], 0
        while start < len(text):
            cut = text.find("\n", start + PIECE_CHARS) + 1 or len(text)
            parts.append(self.sp.encode(text[start:cut]) if start == 0 else self._after_newline(text[start:cut]))
            start = cut
        return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts + ([[self.eos_id]] if eos else [])])

    def _after_newline(self, text: str) -> list[int]:
        """``text``'s tokens where it follows a newline (in the middle of a text)."""
        return self.sp.encode("\n" + text)[len(self._newline):]

    @functools.cached_property
    def _newline(self) -> list[int]:
        return self.sp.encode("\n")

    @functools.cached_property
    def _splits_at_newlines(self) -> bool:
        pieces = ["One\n", "two  words\n", "\n", " three\tfour\n", "five"]
        whole = self.sp.encode("".join(pieces))
        return all(self.sp.encode("\n" + p)[: len(self._newline)] == self._newline for p in pieces[1:]) and \
            whole == self.sp.encode(pieces[0]) + [t for p in pieces[1:] for t in self._after_newline(p)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
