#!/usr/bin/env python
"""Print a model's continuation of a prompt, one offloaded pass over the blocks per token.

    python test_gen.py path/to/model [device] [--prompt TEXT] [--max-new-tokens N]
                       [--temperature T] [--top-p P] [--seed S]
    python test_gen.py path/to/model --chat [--prompt TEXT] [--system TEXT]

Works on a model folder, Meta's or Hugging Face's (imported into the work-dir cache on first use, reused after)
and on a folder that finetune.py exported. Greedy unless --temperature is above 0. ``--chat``
talks in the model's chat format (as finetune.py trains on chat JSONL: llama2's, Llama 3's, or its folder's chat template): with --prompt it answers
that one user turn, without it it reads your turns from stdin until an empty line or EOF.
"""
from __future__ import annotations

from pathlib import Path

import slowft
from slowft.cli import ArgumentParser, parse_size, run
from slowft.errors import SlowftError
from slowft.lora import read_peft
from slowft.tokenizer import load_tokenizer

DEFAULT_PROMPT = "The keeper of the north light"


def main(argv=None) -> int:
    ap = ArgumentParser(description="Continue a prompt with a llama model whose blocks stay on SSD.")
    ap.add_argument("model", type=Path, help="a model folder (Meta's or Hugging Face's) or a finetune.py export")
    ap.add_argument("device", nargs="?", default="auto", help="auto (mps > cuda > cpu), mps, cuda, cpu")
    ap.add_argument("--prompt", default=None, help=f"default: {DEFAULT_PROMPT!r} (with --chat: read turns from stdin)")
    ap.add_argument("--chat", action="store_true", help="answer in the model's chat format, streaming")
    ap.add_argument("--system", default=None, help="with --chat: the system message")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 48 (with --chat: 256)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--adapters", type=Path, default=None, help="a LoRA adapters folder in PEFT's layout, applied to the model")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--ram-budget", type=parse_size, default=None, help="RAM for resident blocks, e.g. 8G")
    a = ap.parse_args(argv)
    if a.system is not None and not a.chat:
        raise SlowftError("--system: a chat's system message; expected it with --chat")
    a.max_new_tokens = a.max_new_tokens or (256 if a.chat else 48)
    if a.max_new_tokens <= 0:
        raise SlowftError(f"--max-new-tokens {a.max_new_tokens}: expected a positive integer")
    if not 0 <= a.temperature < float("inf") or not 0 < a.top_p <= 1:
        raise SlowftError("--temperature must be >= 0 and --top-p in (0, 1]")

    with slowft.load(a.model, workdir=a.workdir, device=a.device, storage_dtype="auto", compute_dtype=a.compute_dtype,
                     ram_budget=a.ram_budget) as model:
        tokenizer = load_tokenizer(model.store.root)
        if a.adapters is not None:
            settings, pairs = read_peft(a.adapters, model.args)
            model.enable_lora(**settings).load(pairs)
        if a.chat:
            talk(model, tokenizer, a)
            return 0
        prompt = a.prompt if a.prompt is not None else DEFAULT_PROMPT
        print(prompt, end="", flush=True)
        stream = Stream()
        text = slowft.generate(model, tokenizer, prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, on_text=stream)
        stream.end(text)
    return 0


class Stream:
    """Prints a text as its tokens arrive (a 13B token takes seconds), holding trailing blanks."""

    def __init__(self):
        self.shown = 0

    def __call__(self, text: str) -> None:
        end = len(text.rstrip())
        print(text[self.shown:end], end="", flush=True)
        self.shown = max(self.shown, end)

    def end(self, text: str) -> None:
        print(text[self.shown:].rstrip(), flush=True)


def talk(model, tokenizer, a) -> None:
    """One answer to --prompt, or turns read from stdin until an empty line or EOF."""
    messages = [{"role": "system", "content": a.system}] if a.system else []
    turns = [a.prompt] if a.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return
            user = turns.pop()
        else:
            try:
                user = input("> ").strip()
            except EOFError:
                return
            if not user:
                return
        messages.append({"role": "user", "content": user})
        stream = Stream()
        answer = slowft.chat(model, tokenizer, messages, a.max_new_tokens, a.temperature, a.top_p, a.seed, on_text=stream)
        stream.end(answer)
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    run(main)
