"""Meta's sentencepiece tokenizer, with llama2's BOS convention."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import SlowftError


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

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
