"""llama2's chat format, exactly as Meta's reference ``chat_completion`` builds it.

Each (user, assistant) turn is one ``[INST] user [/INST] answer `` string encoded with BOS and
EOS; a leading system message goes inside the first user turn between ``<<SYS>>`` markers. For
training, a token counts towards the loss only in the answers (with the EOS that ends each): the
model learns to answer, not to ask.
"""
from __future__ import annotations

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")


def _turns(messages: list) -> list[dict]:
    """The messages checked, the system message folded into the first user turn (Meta's way)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError('each message must be {"role": ..., "content": "..."}')
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("a system message must be followed by a user turn")
        first = messages[1]
        messages = [{"role": first["role"], "content": B_SYS + messages[0]["content"] + E_SYS + first["content"]}] + messages[2:]
    for k, m in enumerate(messages):
        if m["role"] != ("user" if k % 2 == 0 else "assistant"):
            raise ValueError("turns must alternate user, assistant, user, ... (after an optional first system message)")
    return messages


def llama2_dialog(tok, messages: list) -> tuple[list[int], list[bool]]:
    """(tokens, counted) of a conversation for training: it must end with an assistant turn."""
    turns = _turns(messages)
    if turns[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn; expected one to learn from")
    tokens: list[int] = []
    counted: list[bool] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        full = tok.encode(f"{prompt} {answer['content'].strip()} ", bos=True, eos=True)
        n = common_prefix(tok.encode(prompt, bos=True), full)
        tokens += full
        counted += [False] * n + [True] * (len(full) - n)
    return tokens, counted


def llama2_prompt(tok, messages: list) -> list[int]:
    """The tokens that ask for the next answer (generation): the turns so far, ending with a user's."""
    turns = _turns(messages)
    if turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to be answered")
    tokens: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        tokens += tok.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
    return tokens + tok.encode(f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", bos=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two encodings share (a prompt's tokens are those of the whole
    string up to where the answer begins, unless a piece spans the seam)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
