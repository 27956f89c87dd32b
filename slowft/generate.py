"""Text generation with a KV cache: each new token costs one pass over the blocks."""
from __future__ import annotations

from collections.abc import Collection

import torch

from .chat import prompt as chat_prompt
from .tokenizer import BaseTokenizer


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
                 seed: int | None = None, stop_ids: Collection[int] = (), on_token=None) -> list[int]:
    """Up to ``max_new_tokens`` tokens after ``prompt_ids``, ending before any of ``stop_ids``."""
    total = min(len(prompt_ids) + max_new_tokens, model.args.max_seq_len)
    kv = model.new_kv_cache(1, total)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model.forward_cached(torch.tensor([prompt_ids]), 0, kv)[0, -1]
    out: list[int] = []
    for pos in range(len(prompt_ids), total):
        nxt = sample(logits, temperature, top_p, gen)
        if nxt in stop_ids:
            break
        out.append(nxt)
        if on_token:
            on_token(out)
        if pos + 1 < total:
            logits = model.forward_cached(torch.tensor([[nxt]]), pos, kv)[0, -1]
    return out


def generate(model, tokenizer: BaseTokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, on_text=None) -> str:
    """The continuation of ``prompt`` (BOS first where the model was trained so), up to the end
    of the text or of a turn (``tokenizer.stop_ids``)."""
    ids = tokenizer.encode(prompt, bos=True)
    body = ids[1:] if tokenizer.add_bos else ids  # the text's own tokens
    head = tokenizer.decode(body)

    def text(out):
        return tokenizer.decode(body + out)[len(head):]

    out = generate_ids(model, ids, max_new_tokens, temperature, top_p, seed, tokenizer.stop_ids,
                       on_token=(lambda o: on_text(text(o))) if on_text else None)
    return text(out)


def chat(model, tokenizer: BaseTokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, seed: int | None = None, on_text=None) -> str:
    """The assistant's answer to a conversation that ends with a user turn, in the model's chat
    format (the one training used, slowft.chat); it ends at any token that ends a turn (EOS,
    and Llama 3's <|eot_id|>)."""
    ids = chat_prompt(tokenizer, messages)

    def text(out):
        return tokenizer.decode(out).strip()

    out = generate_ids(model, ids, max_new_tokens, temperature, top_p, seed, tokenizer.stop_ids,
                       on_token=(lambda o: on_text(text(o))) if on_text else None)
    return text(out)
