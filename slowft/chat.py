"""The chat formats a model is trained and asked in: its tokenizer's chat template, else Meta's.

``dialog`` gives a conversation's (tokens, counted) for training, ``prompt`` the tokens that ask
for the next answer. A tokenizer_config.json chat template is rendered as transformers renders
it; without one, a Llama 3 vocabulary gets Meta's llama3 ChatFormat, any other Meta's llama2
``chat_completion`` format. For training, a token counts towards the loss only in the answers
(with what ends each: EOS or <|eot_id|>): the model learns to answer, not to ask.

llama2: each (user, assistant) turn is one ``[INST] user [/INST] answer `` string encoded with BOS
and EOS; a leading system message goes inside the first user turn between ``<<SYS>>`` markers.
"""
from __future__ import annotations

import functools

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")


def dialog(tok, messages: list) -> tuple[list[int], list[bool]]:
    """(tokens, counted) of a conversation for training, in the model's chat format: it must end
    with an assistant turn; only the answers (and what ends each) count."""
    if tok.chat_template:
        return template_dialog(tok, messages)
    return llama3_dialog(tok, messages) if tok.family == "llama3" else llama2_dialog(tok, messages)


def prompt(tok, messages: list) -> list[int]:
    """The tokens that ask for the next answer (generation), in the model's chat format: the
    turns so far, ending with a user's."""
    if tok.chat_template:
        return template_prompt(tok, messages)
    return llama3_prompt(tok, messages) if tok.family == "llama3" else llama2_prompt(tok, messages)


def _checked(messages: list) -> list[dict]:
    """The messages, each {"role", "content"} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError('each message must be {"role": ..., "content": "..."}')
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
    return messages


def _ending(messages: list[dict], role: str) -> list[dict]:
    """The messages, which end with a ``role`` turn: an answer to learn, or a question to answer."""
    if role == "assistant" and messages[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn; expected one to learn from")
    if role == "user" and messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to be answered")
    return messages


def _turns(messages: list) -> list[dict]:
    """The messages checked, the system message folded into the first user turn (Meta's llama2 way)."""
    messages = _checked(messages)
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
    turns = _ending(_turns(messages), "assistant")
    tokens: list[int] = []
    counted: list[bool] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        ask = f"{B_INST} {user['content'].strip()} {E_INST}"
        full = tok.encode(f"{ask} {answer['content'].strip()} ", bos=True, eos=True)
        n = common_prefix(tok.encode(ask, bos=True), full)
        tokens += full
        counted += [False] * n + [True] * (len(full) - n)
    return tokens, counted


def llama2_prompt(tok, messages: list) -> list[int]:
    """The tokens that ask for the next answer (generation): the turns so far, ending with a user's."""
    turns = _ending(_turns(messages), "user")
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


def _special(tok, token: str) -> int:
    found = tok.token_id(token)
    if found is None:
        raise ValueError(f"the tokenizer has no {token} token; expected Llama 3's special tokens")
    return found


def _llama3_header(tok, role: str) -> list[int]:
    return [_special(tok, "<|start_header_id|>"), *tok.encode(role, bos=False), _special(tok, "<|end_header_id|>"),
            *tok.encode("\n\n", bos=False)]


def _llama3_body(tok, message: dict) -> list[int]:
    return tok.encode(message["content"].strip(), bos=False) + [_special(tok, "<|eot_id|>")]


def llama3_dialog(tok, messages: list) -> tuple[list[int], list[bool]]:
    """Meta's llama3 ChatFormat: <|begin_of_text|>, then each message as its header
    (<|start_header_id|>role<|end_header_id|> and two newlines), its stripped content and
    <|eot_id|>; an assistant message's content and <|eot_id|> count."""
    tokens, counted = [_special(tok, "<|begin_of_text|>")], [False]
    for m in _ending(_checked(messages), "assistant"):
        head, body = _llama3_header(tok, m["role"]), _llama3_body(tok, m)
        tokens += head + body
        counted += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return tokens, counted


def llama3_prompt(tok, messages: list) -> list[int]:
    """Meta's encode_dialog_prompt: the messages, then the assistant's header for the answer."""
    tokens = [_special(tok, "<|begin_of_text|>")]
    for m in _ending(_checked(messages), "user"):
        tokens += _llama3_header(tok, m["role"]) + _llama3_body(tok, m)
    return tokens + _llama3_header(tok, "assistant")


def _raise_exception(message: str):
    """What a template calls to refuse a conversation (e.g. roles that do not alternate)."""
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, and raise_exception."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _render(tok, messages: list, add_generation_prompt: bool) -> str:
    try:
        return _compiled(tok.chat_template).render(messages=messages, bos_token=tok.bos_token or "", eos_token=tok.eos_token,
                                                   add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def template_dialog(tok, messages: list) -> tuple[list[int], list[bool]]:
    """(tokens, counted) of the conversation rendered by the tokenizer's chat template; its
    special tokens' strings are those tokens, and no BOS is added beyond the one it writes. An
    answer's tokens are those between the rendering up to it with the generation prompt and the
    rendering up to and including it: the answer and whatever the template ends it with."""
    messages = _ending(_checked(messages), "assistant")
    if messages[0]["role"] == "assistant":
        raise ValueError("the conversation starts with an assistant turn; expected a system or user message first")
    text = _render(tok, messages, add_generation_prompt=False)
    tokens = tok.encode_with_specials(text)
    counted = [False] * len(tokens)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = _prefix_length(tok, _render(tok, messages[:k], add_generation_prompt=True), text, tokens)
            end = _prefix_length(tok, _render(tok, messages[: k + 1], add_generation_prompt=False), text, tokens)
            counted[start:end] = [True] * (end - start)
    return tokens, counted


def _prefix_length(tok, part: str, text: str, tokens: list[int]) -> int:
    """How many of the conversation's tokens ``tokens`` (of ``text``) make ``part``, a rendering
    of its start. A template whose rendering changes as messages follow is refused: the answers'
    masks would fall on other tokens."""
    ids = tok.encode_with_specials(part)
    if not text.startswith(part):
        raise ValueError(f"the chat template is not prefix-stable: the conversation up to an answer renders as ...{part[-40:]!r}, "
                         "which is not how the whole conversation's rendering begins; expected a template that renders each "
                         "message the same whatever follows it")
    if ids != tokens[: len(ids)]:
        raise ValueError(f"the chat template is not prefix-stable in tokens: the conversation up to an answer, ...{part[-40:]!r}, "
                         "encodes to tokens that do not begin the whole conversation's (a token spans the seam); expected "
                         "turns that end at a special token")
    return len(ids)


def template_prompt(tok, messages: list) -> list[int]:
    """The tokens of the conversation rendered with the template's generation prompt."""
    return tok.encode_with_specials(_render(tok, _ending(_checked(messages), "user"), add_generation_prompt=True))
