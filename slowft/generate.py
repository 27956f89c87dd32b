"""Text generation with a KV cache: each new token costs one pass over the blocks."""
from __future__ import annotations

import torch

from .chat import llama2_prompt
from .tokenizer import Tokenizer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from the top-p mass."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, eos_id: int | None = None, on_token=None) -> list[int]:
    total = min(len(prompt_ids) + max_new_tokens, model.args.max_seq_len)
    kv = model.new_kv_cache(1, total)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model.forward_cached(torch.tensor([prompt_ids]), 0, kv)[0, -1]
    out: list[int] = []
    for pos in range(len(prompt_ids), total):
        nxt = sample(logits, temperature, top_p, gen)
        if nxt == eos_id:
            break
        out.append(nxt)
        if on_token:
            on_token(out)
        if pos + 1 < total:
            logits = model.forward_cached(torch.tensor([[nxt]]), pos, kv)[0, -1]
    return out


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, on_text=None) -> str:
    """The continuation of ``prompt`` (BOS first, as llama2 was trained)."""
    ids = tokenizer.encode(prompt, bos=True)
    head = tokenizer.decode(ids[1:])

    def text(out):
        return tokenizer.decode(ids[1:] + out)[len(head):]

    out = generate_ids(model, ids, max_new_tokens, temperature, top_p, seed, tokenizer.eos_id,
                       on_token=(lambda o: on_text(text(o))) if on_text else None)
    return text(out)


def chat(model, tokenizer: Tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, seed: int | None = None, on_text=None) -> str:
    """The assistant's answer to a conversation that ends with a user turn, in llama2's chat
    format (the one training used, slowft.chat); it ends at the model's EOS."""
    ids = llama2_prompt(tokenizer, messages)

    def text(out):
        return tokenizer.decode(out).strip()

    out = generate_ids(model, ids, max_new_tokens, temperature, top_p, seed, tokenizer.eos_id,
                       on_token=(lambda o: on_text(text(o))) if on_text else None)
    return text(out)
