#!/usr/bin/env python
"""Print a model's continuation of a prompt, one offloaded pass over the blocks per token.

    python test_gen.py path/to/model [device] [--prompt TEXT] [--max-new-tokens N]
                       [--temperature T] [--top-p P] [--seed S]

Works on a Meta llama2 folder (imported into the work-dir cache on first use, reused after)
and on a folder that finetune.py exported. Greedy unless --temperature is above 0.
"""
from __future__ import annotations

from pathlib import Path

import slowft
from slowft.cli import ArgumentParser, parse_size, run
from slowft.errors import SlowftError

DEFAULT_PROMPT = "The keeper of the north light"


def main(argv=None) -> int:
    ap = ArgumentParser(description="Continue a prompt with a llama2 model whose blocks stay on SSD.")
    ap.add_argument("model", type=Path, help="Meta llama2 folder or a finetune.py export")
    ap.add_argument("device", nargs="?", default="auto", help="auto (mps > cuda > cpu), mps, cuda, cpu")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--ram-budget", type=parse_size, default=None, help="RAM for resident blocks, e.g. 8G")
    a = ap.parse_args(argv)
    if a.max_new_tokens <= 0:
        raise SlowftError(f"--max-new-tokens {a.max_new_tokens}: expected a positive integer")
    if not 0 <= a.temperature < float("inf") or not 0 < a.top_p <= 1:
        raise SlowftError("--temperature must be >= 0 and --top-p in (0, 1]")

    with slowft.load(a.model, workdir=a.workdir, device=a.device, storage_dtype="auto", compute_dtype=a.compute_dtype,
                     ram_budget=a.ram_budget) as model:
        tokenizer = slowft.Tokenizer(model.store.path("tokenizer.model"))
        print(a.prompt, end="", flush=True)
        shown = [0]

        def stream(text: str) -> None:  # print as tokens arrive (a 13B token takes seconds), holding trailing blanks
            end = len(text.rstrip())
            print(text[shown[0]:end], end="", flush=True)
            shown[0] = max(shown[0], end)

        text = slowft.generate(model, tokenizer, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, on_text=stream)
        print(text[shown[0]:].rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
