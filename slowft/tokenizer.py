"""The model's tokenizer, whichever of the llama families' files holds it.

llama2 ships Meta's sentencepiece ``tokenizer.model``, Llama 3 a tiktoken BPE file under the same
name, and a Hugging Face folder a ``tokenizer.json``, often with a ``tokenizer_config.json`` that
names the BOS/EOS tokens and carries the chat template. ``load_tokenizer(folder)`` finds which
and gives one interface over all three (``BaseTokenizer``), so training, generation and export
need not know. ``Tokenizer(path)`` is the sentencepiece kind.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .errors import SlowftError


PIECE_CHARS = 1 << 20  # characters of a long text encoded at a time (~1 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TURN_ENDS = ("<|eot_id|>", "<|end_of_text|>")  # Llama 3's: generation stops at these as at EOS


@dataclass(frozen=True)
class TokenizerConfig:
    """What a Hugging Face tokenizer_config.json says (unset without one: the tokenizer's own
    tokens hold), and the folder's tokenizer files that a checkpoint must carry along."""
    path: Path | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = True
    chat_template: str | None = None
    files: tuple[Path, ...] = ()


def read_config(folder: Path) -> TokenizerConfig:
    """``folder``'s tokenizer_config.json (a chat template may also sit in chat_template.jinja,
    where newer transformers saves it)."""
    folder = Path(folder)
    files = tuple(folder / name for name in TOKENIZER_FILES if (folder / name).is_file())
    path = folder / "tokenizer_config.json"
    raw = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SlowftError(f"{path}: not readable JSON ({str(e).splitlines()[0][:80]}); "
                              "expected Hugging Face's tokenizer_config.json") from None
        if not isinstance(raw, dict):
            raise SlowftError(f"{path}: holds a {type(raw).__name__}; expected a JSON object")
    add_bos = raw.get("add_bos_token", True)
    if not isinstance(add_bos, bool):
        raise SlowftError(f"{path}: add_bos_token is {add_bos!r}; expected true or false")
    template = _chat_template(raw.get("chat_template"), path)
    if template is None and (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlowftError(f"{folder / 'chat_template.jinja'}: not readable ({e}); expected a Jinja chat template in UTF-8") from None
    return TokenizerConfig(path if path.is_file() else None, _token(raw, "bos_token", path), _token(raw, "eos_token", path),
                           add_bos, template or None, files)


def _token(raw: dict, key: str, path: Path) -> str | None:
    value = raw.get(key)
    if isinstance(value, dict):  # transformers' AddedToken: {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value or None
    raise SlowftError(f'{path}: {key} is {value!r}; expected a token string or {{"content": "..."}}')


def _chat_template(value, path: Path) -> str | None:
    """A template string, or the one named "default" among several ({"name", "template"} each)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise SlowftError(f"{path}: chat_template has templates {sorted(named)} but none named 'default'; expected a default one")
    raise SlowftError(f'{path}: chat_template is a {type(value).__name__}; expected a string or a list of {{"name", "template"}}')


class BaseTokenizer:
    """What every kind shares: ``n_words`` (with the special tokens), ``bos_id``/``eos_id`` and
    their strings, ``add_bos``, ``stop_ids`` (the ids that end generation), ``family`` ("llama3"
    where the vocabulary has Llama 3's chat headers, else "llama2"), ``chat_template`` (or
    None), ``files`` (the tokenizer's files, for a checkpoint to carry along), and the methods
    below. A kind sets ``path`` and ``n_words``, provides ``token_id``, ``encode(text, bos,
    eos)``, ``encode_with_specials(text)`` and ``decode(ids)``, then calls ``_set_specials``."""
    path: Path
    n_words: int

    def token_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text``; None where this vocabulary has none."""
        raise NotImplementedError

    def _set_specials(self, config: TokenizerConfig, bos: str | None, eos: str | None) -> None:
        """BOS/EOS as tokenizer_config.json names them, else the tokenizer's own (``bos``,
        ``eos``); from them the ids that end generation and the chat family."""
        self.files = [self.path, *(f for f in config.files if f != self.path)]
        self.add_bos, self.chat_template = config.add_bos_token, config.chat_template
        self.bos_token, self.eos_token = config.bos_token or bos, config.eos_token or eos
        for name, token in (("bos_token", config.bos_token), ("eos_token", config.eos_token)):
            if token is not None and self.token_id(token) is None:
                raise SlowftError(f"{config.path}: {name} {token!r} is not a token of {self.path}; expected one of its special tokens")
        config_file = self.path.parent / "tokenizer_config.json"
        if self.eos_token is None:
            raise SlowftError(f"{self.path}: has no EOS token (</s> or <|end_of_text|>); expected eos_token in {config_file}")
        if self.bos_token is None and self.add_bos:
            raise SlowftError(f"{self.path}: has no BOS token (<s> or <|begin_of_text|>); expected bos_token in {config_file}")
        self.bos_id = None if self.bos_token is None else self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)
        turn_ends = (self.token_id(t) for t in TURN_ENDS)
        self.stop_ids = frozenset({self.eos_id, *(i for i in turn_ends if i is not None)})
        self.family = "llama3" if self.token_id("<|start_header_id|>") is not None else "llama2"

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """BOS first where asked and the model uses one (add_bos_token), EOS last where asked."""
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_long(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """``encode`` as int32, as training holds tokens."""
        return np.asarray(self.encode(text, bos, eos), dtype=np.int32)


class NotSentencePiece(SlowftError):
    """A tokenizer.model sentencepiece cannot read: Llama 3's tiktoken file is tried next."""


class Tokenizer(BaseTokenizer):
    """Meta's sentencepiece tokenizer.model (llama2), with llama2's BOS convention."""

    def __init__(self, path, config: TokenizerConfig = TokenizerConfig()):
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise NotSentencePiece(f"{self.path}: not a readable sentencepiece model ({str(e).splitlines()[0][:80]}); "
                                   "expected Meta's tokenizer.model") from None
        self.n_words = self.sp.vocab_size()
        own = [self.sp.id_to_piece(i) if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id())]
        self._set_specials(config, *own)

    @functools.cached_property
    def _specials(self) -> dict[str, int]:
        """Control and unknown pieces (<s>, </s>, <unk>): those plain text never encodes to."""
        return {self.sp.id_to_piece(i): i for i in range(self.n_words) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def token_id(self, text: str) -> int | None:
        return self._specials.get(text)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._wrap(self.sp.encode(text), bos, eos)

    def encode_with_specials(self, text: str) -> list[int]:
        """Tokens of a rendered chat template, where "<s>", "</s>" stand for those tokens; the
        text between them is encoded piece by piece, as transformers' LlamaTokenizer does."""
        ids: list[int] = []
        for k, part in enumerate(self._special_pattern.split(text)):  # odd k: a special token
            ids += [self._specials[part]] if k % 2 else self.sp.encode(part) if part else []
        return ids

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern:
        return re.compile("(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True)) + ")")

    def encode_long(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """``encode`` for a text of any length, as int32: sentencepiece takes ~45 bytes per byte of
        text while it encodes, so a long text goes about a MB at a time, cut after a newline and
        each piece after the first encoded behind a newline that is then dropped (llama's pieces
        never hold a newline, so the tokens are those of the whole text; checked on this
        tokenizer first, else the text goes whole)."""
        if len(text) <= PIECE_CHARS or not self._splits_at_newlines:
            return np.asarray(self.encode(text, bos, eos), dtype=np.int32)
        parts, start = [self._wrap([], bos, False)], 0
        while start < len(text):
            cut = text.find("\n", start + PIECE_CHARS) + 1 or len(text)
            parts.append(self.sp.encode(text[start:cut]) if start == 0 else self._after_newline(text[start:cut]))
            start = cut
        return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts + [self._wrap([], False, eos)]])

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


def load_tokenizer(folder: Path) -> BaseTokenizer:
    """The tokenizer of the model in ``folder``: tokenizer.json (Hugging Face) first, else
    tokenizer.model (sentencepiece, else Llama 3's tiktoken), with its tokenizer_config.json."""
    folder = Path(folder)
    config = read_config(folder)
    if (folder / "tokenizer.json").is_file():
        from . import bpe  # (tiktoken and tokenizers: imported only for a model that needs them)
        return bpe.HFTokenizer(folder / "tokenizer.json", config)
    if not (folder / "tokenizer.model").is_file():
        raise SlowftError(f"{folder / 'tokenizer.json'}: missing, and no tokenizer.model; expected this model's tokenizer")
    try:
        return Tokenizer(folder / "tokenizer.model", config)
    except NotSentencePiece:
        from . import bpe
        return bpe.Llama3Tokenizer(folder / "tokenizer.model", config)
