"""Training text: plain-text files and JSONL examples -> one token stream -> the rows of a step:
random windows of text alone, or, where there are examples, examples whole and text in pieces,
packed (TokenData.spans), reproducible per step.

A ``.txt`` file is a document, all of it learned. A ``.jsonl`` file holds one example a line:
``{"text": ...}`` (a document), ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``
(llama2's chat format, slowft.chat); in the last two only the completion or the assistant's
answers count towards the loss, with the EOS that ends them, unless ``train_on_prompt``.

The batch of step t depends only on (seed, t), so a resumed run sees exactly the batches an
uninterrupted one would, without saving a data position.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .chat import common_prefix, dialog
from .errors import SlowftError
from .progress import progress
from .tokenizer import BaseTokenizer


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
            found = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl") and not f.name.startswith("."))
            if not found:
                raise SlowftError(f"{flag} {p}: folder has no .txt or .jsonl files; expected plain-text files or JSONL")
            files += found
        else:
            files.append(p)
    return files


def read_examples(path: Path, tok: BaseTokenizer, train_on_prompt: bool = False, flag: str = "--data"):
    """(tokens, counted) of each example of a JSONL file; a bad line is named with its number."""
    out = []
    for n, line in enumerate(read_text(path, flag).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{flag} {path}:{n}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlowftError(f"{where}: malformed JSON ({e.msg}); expected one JSON object a line") from None
        try:
            tokens, counted = _example(ex, tok)
        except ValueError as e:
            raise SlowftError(f"{where}: {e}") from None
        out.append((tokens, [True] * len(tokens) if train_on_prompt else counted))
    if not out:
        raise SlowftError(f"{flag} {path}: no examples; expected one JSON object a line")
    return out


def _example(ex, tok: BaseTokenizer) -> tuple[list[int], list[bool]]:
    keys = set(ex) if isinstance(ex, dict) else set()
    if keys == {"text"} and isinstance(ex["text"], str):
        tokens = tok.encode(ex["text"], bos=True, eos=True)
        return tokens, [True] * len(tokens)
    if keys == {"prompt", "completion"} and all(isinstance(ex[k], str) for k in keys):
        tokens = tok.encode(ex["prompt"] + ex["completion"], bos=True, eos=True)
        n = common_prefix(tok.encode(ex["prompt"], bos=True), tokens)
        return tokens, [False] * n + [True] * (len(tokens) - n)
    if keys == {"messages"}:
        return dialog(tok, ex["messages"])
    raise ValueError(f"unknown example with keys {sorted(keys) if keys else type(ex).__name__}; expected "
                     '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}')


class TokenData:
    def __init__(self, tokens: torch.Tensor, sources: list[Path], lengths: list[int] | None = None, flag: str = "--data",
                 counted: torch.Tensor | None = None):
        self.tokens, self.sources, self.flag = tokens, sources, flag
        self.lengths = lengths or [tokens.numel()]  # tokens of each document (or example), in order
        self.counted = counted  # bool per token: whether it counts as a target (None: every one)

    @classmethod
    def from_files(cls, paths: list[Path], tokenizer: BaseTokenizer, flag: str = "--data", train_on_prompt: bool = False) -> "TokenData":
        """A text file is one document: BOS, its tokens, EOS; a JSONL file one such document per
        example. Held as int32 (4 bytes a token)."""
        files = text_files(paths, flag)
        parts, counted, sources = [], [], []
        size = {f: f.stat().st_size if f.is_file() else 0 for f in files}  # read_text names what is missing
        with progress(sum(size.values()), "tokenize", leave=False) as bar:
            for f in files:
                if f.suffix == ".jsonl":
                    for tokens, mask in read_examples(f, tokenizer, train_on_prompt, flag):
                        parts.append(np.asarray(tokens, dtype=np.int32))
                        counted.append(np.asarray(mask, dtype=bool))
                        sources.append(f)
                else:
                    parts.append(tokenizer.encode_long(read_text(f, flag), bos=True, eos=True))
                    counted.append(np.ones(len(parts[-1]), dtype=bool))
                    sources.append(f)
                bar.update(size[f])
        mask = torch.from_numpy(np.concatenate(counted))
        return cls(torch.from_numpy(np.concatenate(parts)), sources, [len(p) for p in parts], flag,
                   None if bool(mask.all()) else mask)

    @property
    def examples(self) -> bool:
        """Whether the data holds JSONL examples: then its rows are packed (``packed_batch``),
        rather than cut as windows from the stream, which is kept for text alone."""
        return any(Path(f).suffix == ".jsonl" for f in self.sources)

    def truncated(self, seq_len: int) -> int:
        """How many JSONL examples are longer than a row (their ends are cut off when packed)."""
        return sum(n - 1 > seq_len for n, f in zip(self.lengths, self.sources) if Path(f).suffix == ".jsonl")

    def spans(self, seq_len: int) -> list[tuple[int, int]]:
        """(offset, length) in the stream of what packs into rows. A JSONL example is one span, so
        it is learned whole, its positions starting at 0 as when it is asked at generation. A text
        document is cut into pieces of at most seq_len + 1 tokens (each piece's last token only a
        target, and the next piece's first), so that mixed data packs as one pool, each token
        drawn as often as any other: prose is neither cut off nor crowded out by the examples, and
        no example is split across windows of one stream. (Text alone keeps its random windows.)"""
        spans, at = [], 0
        for n, f in zip(self.lengths, self.sources):
            if Path(f).suffix == ".jsonl":
                spans.append((at, n))
            else:
                spans += [(at + s, min(seq_len + 1, n - s)) for s in range(0, n - 1, seq_len)]
            at += n
        return spans

    def packed_batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0):
        """(tokens, targets, segments), each [batch_size, seq_len]: the spans, in an order drawn by
        (seed, step), packed one after another into rows (see ``_pack``)."""
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
        spans = self.spans(seq_len)
        order = torch.randperm(len(spans), generator=gen).tolist()
        return self._pack([spans[i] for i in order], seq_len, batch_size)

    def packed_rows(self, seq_len: int):
        """(tokens, targets, segments) [n, seq_len]: every span once, in order (held-out
        evaluation of examples: each scored whole, on its own)."""
        return self._pack(self.spans(seq_len), seq_len)

    def _pack(self, spans: list[tuple[int, int]], seq_len: int, rows: int | None = None):
        """Spans packed one after another into rows, ``rows`` of them (going round the spans
        again if need be), or as many as hold each span once (``rows`` None). One too long for a
        row is cut to fit it. Each span's id in its row is in ``segments`` (0 where a row is
        padded), so attention stays within it; targets are the next token within the span, -1
        where it does not count."""
        stream, k, out = self.tokens.long(), 0, []
        while (len(out) < rows) if rows is not None else (k < len(spans)):
            row = torch.zeros(seq_len, dtype=torch.long), torch.full((seq_len,), -1), torch.zeros(seq_len, dtype=torch.long)
            at, seg = 0, 1
            while at < seq_len and (rows is not None or k < len(spans)):
                a, n = spans[k % len(spans)]
                n = min(n - 1, seq_len)  # inputs: all but the last token
                if at and at + n > seq_len:
                    break  # the next row starts with it
                row[0][at : at + n], row[1][at : at + n] = stream[a : a + n], self._targets(stream, a + 1, a + n + 1)
                row[2][at : at + n] = seg
                at, seg, k = at + n, seg + 1, k + 1
            out.append(row)
        return tuple(torch.stack(parts) for parts in zip(*out))

    def split(self, fraction: float, seed: int) -> tuple["TokenData", "TokenData"]:
        """(training documents, held-out documents): ``fraction`` of the documents, at least one,
        chosen by ``seed``, so a resumed run holds out the same ones."""
        n = len(self.lengths)
        if n < 2:
            raise SlowftError(f"--val-fraction {fraction}: {self.flag} has {n} document; expected at least 2 to hold "
                              "some out (or pass --val-data)")
        held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[: max(1, round(fraction * n))])
        mask = self.counted if self.counted is not None else torch.ones(len(self), dtype=torch.bool)
        docs = list(zip(self.tokens.split(self.lengths), self.sources, self.lengths, mask.split(self.lengths)))

        def part(keep) -> "TokenData":
            chosen = [d for i, d in enumerate(docs) if keep(i)]
            counted = torch.cat([c for *_, c in chosen])
            return TokenData(torch.cat([t for t, *_ in chosen]), [d[1] for d in chosen], [d[2] for d in chosen], self.flag,
                             None if bool(counted.all()) else counted)

        return part(lambda i: i not in held), part(lambda i: i in held)

    def windows(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole stream as consecutive [n, seq_len] windows and their targets (held-out
        evaluation: every token scored once, but a window's first)."""
        n = (len(self) - 1) // seq_len
        stream = self.tokens.long()
        return stream[: n * seq_len].view(n, seq_len), self._targets(stream, 1, n * seq_len + 1).view(n, seq_len)

    def _targets(self, stream: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """stream[a:b] as targets: -1 where a token does not count (a prompt's)."""
        t = stream[a:b]
        return t if self.counted is None else t.masked_fill(~self.counted[a:b], -1)

    def __len__(self) -> int:
        return self.tokens.numel()

    def fingerprint(self) -> str:
        """Identifies the token stream, so a run resumes only on the data it started with."""
        h = hashlib.sha256()
        for chunk in self.tokens.split(1 << 20):  # of the int64 stream, as it was first held
            h.update(chunk.numpy().astype(np.int64).tobytes())
        if self.counted is not None:  # (text alone: as before examples came in)
            h.update(self.counted.numpy().tobytes())
        digest = h.hexdigest()[:16]
        return f"{len(self)} tokens, {digest}"

    def check(self, seq_len: int) -> None:
        """Windows need a stream of a row and its last target; packed rows need an example that
        fits whole (one cut to fit may lose every counted token)."""
        names = ", ".join(dict.fromkeys(str(f) for f in self.sources))
        if self.examples and self.truncated(seq_len) == len(self.lengths):
            raise SlowftError(f"{self.flag} {names}: no example fits in --seq-len {seq_len} (the shortest needs "
                              f"--seq-len {min(self.lengths) - 1}); expected at least one that fits")
        if not self.examples and len(self) < seq_len + 1:
            raise SlowftError(
                f"{self.flag} {names}: {len(self)} tokens, shorter than one sequence; expected at least --seq-len + 1 = {seq_len + 1}"
            )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each [batch_size, seq_len]: random windows, targets shifted by one."""
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=gen)
        stream = self.tokens.long()
        tokens = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        targets = torch.stack([self._targets(stream, s + 1, s + seq_len + 1) for s in starts.tolist()])
        return tokens, targets
