"""Training text: plain-text files -> one token stream -> random windows, reproducible per step.

The batch of step t depends only on (seed, t), so a resumed run sees exactly the batches an
uninterrupted one would, without saving a data position.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .errors import SlowftError
from .progress import progress
from .tokenizer import Tokenizer


def read_text(path: Path, flag: str = "--data") -> str:
    path = Path(path)
    if not path.is_file():
        raise SlowftError(f"{flag} {path}: no such file; expected a plain-text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise SlowftError(f"{flag} {path}: file is empty; expected plain text")
    if b"\0" in raw[:65536]:
        raise SlowftError(f"{flag} {path}: looks binary (contains NUL bytes); expected UTF-8 plain text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlowftError(f"{flag} {path}: not UTF-8 text (bad byte at offset {e.start}); expected UTF-8 plain text") from None


def text_files(paths: list[Path], flag: str = "--data") -> list[Path]:
    """Files as given; a folder stands for its *.txt files (not hidden ones, like the ._notes.txt
    macOS leaves beside notes.txt on some drives)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.txt") if not f.name.startswith("."))
            if not found:
                raise SlowftError(f"{flag} {p}: folder has no .txt files; expected plain-text files")
            files += found
        else:
            files.append(p)
    return files


class TokenData:
    def __init__(self, tokens: torch.Tensor, sources: list[Path], lengths: list[int] | None = None, flag: str = "--data"):
        self.tokens, self.sources, self.flag = tokens, sources, flag
        self.lengths = lengths or [tokens.numel()]  # tokens of each document, in order

    @classmethod
    def from_files(cls, paths: list[Path], tokenizer: Tokenizer, flag: str = "--data") -> "TokenData":
        """Each file is one document: BOS, its tokens, EOS. Held as int32 (4 bytes a token)."""
        files = text_files(paths, flag)
        parts, size = [], {f: f.stat().st_size if f.is_file() else 0 for f in files}  # read_text names what is missing
        with progress(sum(size.values()), "tokenize", leave=False) as bar:
            for f in files:
                parts.append(tokenizer.encode_long(read_text(f, flag), bos=True, eos=True))
                bar.update(size[f])
        return cls(torch.from_numpy(np.concatenate(parts)), files, [len(p) for p in parts], flag)

    def split(self, fraction: float, seed: int) -> tuple["TokenData", "TokenData"]:
        """(training documents, held-out documents): ``fraction`` of the documents, at least one,
        chosen by ``seed``, so a resumed run holds out the same ones."""
        n = len(self.lengths)
        if n < 2:
            raise SlowftError(f"--val-fraction {fraction}: {self.flag} has {n} document; expected at least 2 to hold "
                              "some out (or pass --val-data)")
        held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[: max(1, round(fraction * n))])
        docs = list(zip(self.tokens.split(self.lengths), self.sources, self.lengths))

        def part(keep) -> "TokenData":
            chosen = [d for i, d in enumerate(docs) if keep(i)]
            return TokenData(torch.cat([t for t, _, _ in chosen]), [f for _, f, _ in chosen], [k for _, _, k in chosen], self.flag)

        return part(lambda i: i not in held), part(lambda i: i in held)

    def windows(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stream as consecutive [n, seq_len] windows and their targets (held-out
        evaluation: every token scored once, but a window's first)."""
        n = (len(self) - 1) // seq_len
        stream = self.tokens.long()
        return stream[: n * seq_len].view(n, seq_len), stream[1 : n * seq_len + 1].view(n, seq_len)

    def __len__(self) -> int:
        return self.tokens.numel()

    def fingerprint(self) -> str:
        """Identifies the token stream, so a run resumes only on the data it started with."""
        h = hashlib.sha256()
        for chunk in self.tokens.split(1 << 20):  # of the int64 stream, as it was first held
            h.update(chunk.numpy().astype(np.int64).tobytes())
        digest = h.hexdigest()[:16]
        return f"{len(self)} tokens, {digest}"

    def check(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            names = ", ".join(str(f) for f in self.sources)
            raise SlowftError(
                f"{self.flag} {names}: {len(self)} tokens, shorter than one sequence; expected at least --seq-len + 1 = {seq_len + 1}"
            )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each [batch_size, seq_len]: random windows, targets shifted by one."""
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=gen)
        windows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
