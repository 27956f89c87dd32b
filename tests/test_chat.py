"""Chat formats (llama2's and Llama 3's as Meta builds them, a model's own template), JSONL examples
with prompt masking, and chat generation that stops at the end of a turn."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from slowft.chat import dialog, llama2_dialog, llama2_prompt, llama3_dialog, llama3_prompt, prompt
from slowft.data import TokenData
from slowft.errors import SlowftError
from slowft.generate import chat, generate, generate_ids
from slowft.tiny_tokenizers import prose, write_hf_tokenizer, write_tiktoken_model
from slowft.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny):
    return Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")


def test_a_dialog_is_metas_format_and_counts_only_the_answers(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the ferry?"},
                {"role": "assistant", "content": "At the quay."}, {"role": "user", "content": " And the keeper? "},
                {"role": "assistant", "content": "In the lighthouse."}]
    tokens, counted = llama2_dialog(tok, messages)
    # Meta's reference: the system message inside the first [INST], each turn BOS ... EOS, contents stripped
    first = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere is the ferry? [/INST] At the quay. ", bos=True, eos=True)
    second = tok.encode("[INST] And the keeper? [/INST] In the lighthouse. ", bos=True, eos=True)
    assert tokens == first + second
    answers = [t for t, c in zip(tokens, counted) if c]
    assert tok.decode(answers).replace(" ", "").startswith("Atthequay.") and answers[-1] == tok.eos_id
    assert answers.count(tok.eos_id) == 2 and not any(counted[:5])  # each answer's EOS counts, the prompt does not
    ask = llama2_prompt(tok, messages[:4])  # for generation: up to the user's last turn, no EOS after it
    assert ask == first + tok.encode("[INST] And the keeper? [/INST]", bos=True)


@pytest.mark.parametrize("line,message", [
    ('{"text": "unclosed', "malformed JSON"),
    ('{"question": "x", "answer": "y"}', "unknown example with keys ['answer', 'question']"),
    ('{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role 'narrator'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "does not end with an assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "must alternate"),
])
def test_bad_examples_name_the_file_and_line(tok, tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a fine first line"}\n\n' + line + "\n")
    with pytest.raises(SlowftError) as e:
        TokenData.from_files([path], tok)
    assert f"--data {path}:3: " in str(e.value) and message in str(e.value)


def test_prompt_completion_and_text_examples_and_their_targets(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Q: Where is the ferry?\nA:", "completion": " At the quay."}, {"text": "The lamp was lit."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = TokenData.from_files([path], tok)
    whole = tok.encode(rows[0]["prompt"] + rows[0]["completion"], bos=True, eos=True)
    text = tok.encode(rows[1]["text"], bos=True, eos=True)
    assert data.tokens.tolist() == whole + text and data.lengths == [len(whole), len(text)]
    prompt = len(tok.encode(rows[0]["prompt"], bos=True))
    assert data.counted.tolist() == [False] * prompt + [True] * (len(whole) - prompt) + [True] * len(text)
    x, y = data.windows(len(data) - 1)  # targets of the prompt's tokens are not counted (-1)
    assert torch.equal(x[0, 1:], data.tokens[1:-1].long()) and (y[0, : prompt - 1] == -1).all() and (y[0, prompt - 1 :] >= 0).all()
    every = TokenData.from_files([path], tok, train_on_prompt=True)
    assert every.counted is None and every.fingerprint() != data.fingerprint()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SlowftError, match="file is empty"):
        TokenData.from_files([empty], tok)


def test_examples_are_packed_whole_into_rows(tok, tmp_path):
    """JSONL examples go into rows whole, one after another, each with an id of its own (0 where
    a row is padded); one longer than a row is cut to fit it, and counted."""
    path = tmp_path / "data.jsonl"
    texts = ["one two three", "the ferry left the quay at dawn", "salt", "a long one " * 12]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    data = TokenData.from_files([path], tok)
    assert data.examples and data.truncated(16) >= 1 and data.truncated(1000) == 0
    tokens, targets, segments = data.packed_batch(step=0, batch_size=4, seq_len=16, seed=1)
    offsets = [0] + torch.tensor(data.lengths).cumsum(0).tolist()
    found = []
    for row in range(4):
        for seg in segments[row].unique().tolist():
            if seg == 0:
                assert (targets[row][segments[row] == 0] == -1).all()
                continue
            at = (segments[row] == seg).nonzero().squeeze(1)
            assert torch.equal(at, torch.arange(at[0], at[-1] + 1))  # contiguous
            piece = tokens[row, at].tolist()
            e = next(k for k in range(4) if data.tokens[offsets[k] : offsets[k] + len(piece)].tolist() == piece)
            assert len(piece) == min(data.lengths[e] - 1, 16)  # whole (but its last token), or cut to the row
            assert targets[row, at].tolist() == data.tokens[offsets[e] + 1 : offsets[e] + 1 + len(piece)].tolist()
            found.append(e)
    assert set(found) == {0, 1, 2, 3}
    assert not TokenData.from_files([tmp_path / "data.jsonl"], tok).packed_batch(0, 4, 16, 1)[0].equal(
        TokenData.from_files([tmp_path / "data.jsonl"], tok).packed_batch(1, 4, 16, 1)[0])  # a new order each step


# Llama 3 and chat templates: Meta's ChatFormat, and templates rendered as transformers renders them

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the ferry?"},
            {"role": "assistant", "content": "At the quay."}, {"role": "user", "content": " And the keeper? "},
            {"role": "assistant", "content": "In the lighthouse."}]
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = (  # Llama-2-7b-chat-hf's tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
    "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR_TEMPLATE = """{% for m in messages %}
    {{- '<|' + m['role'] + '|>\\n' + m['content'] + eos_token -}}
{% endfor %}
  {% if add_generation_prompt %}
    {{- '<|assistant|>\\n' -}}
{% endif %}
"""  # no BOS; its indents and the newlines after its tags go (trim_blocks, lstrip_blocks), as in transformers


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    n_words = write_tiktoken_model(folder / "tokenizer.model", prose())
    return load_tokenizer(folder), n_words - 256


def test_a_llama3_dialog_is_metas_chat_format_and_counts_only_the_answers(llama3, tok):
    tok3, n_base = llama3
    bos, start, end, eot = n_base, n_base + 6, n_base + 7, n_base + 9  # Meta's special tokens, by position

    def enc(text):
        return tok3.encode(text, bos=False)

    def message(role, content):
        return [start] + enc(role) + [end] + enc("\n\n") + enc(content) + [eot]

    tokens, counted = dialog(tok3, MESSAGES)
    expected = [bos] + message("system", "Be brief.") + message("user", "Where is the ferry?") + message("assistant", "At the quay.") \
        + message("user", "And the keeper?") + message("assistant", "In the lighthouse.")
    assert tokens == expected
    answers = [t for t, c in zip(tokens, counted) if c]
    assert answers == enc("At the quay.") + [eot] + enc("In the lighthouse.") + [eot]
    assert prompt(tok3, MESSAGES[:4]) == expected[: len(expected) - len(message("assistant", "In the lighthouse."))] \
        + [start] + enc("assistant") + [end] + enc("\n\n")
    assert dialog(tok, MESSAGES) == llama2_dialog(tok, MESSAGES) and prompt(tok, MESSAGES[:4]) == llama2_prompt(tok, MESSAGES[:4])
    with pytest.raises(ValueError, match="does not end with an assistant turn"):
        dialog(tok3, MESSAGES[:4])


def test_llamas_own_chat_templates_give_metas_formats(tmp_path, tok):
    """Llama 3 Instruct's and Llama 2 chat's templates, rendered and masked here, are token for
    token Meta's formats, masks included."""
    write_hf_tokenizer(tmp_path / "llama3", prose(), chat_template=LLAMA3_TEMPLATE)
    tok3 = load_tokenizer(tmp_path / "llama3")
    assert dialog(tok3, MESSAGES) == llama3_dialog(tok3, MESSAGES) and dialog(tok3, MESSAGES) != llama2_dialog(tok3, MESSAGES)
    assert prompt(tok3, MESSAGES[:4]) == llama3_prompt(tok3, MESSAGES[:4])
    (tmp_path / "llama2").mkdir()
    shutil.copy(tok.path, tmp_path / "llama2" / "tokenizer.model")
    (tmp_path / "llama2" / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_TEMPLATE}))
    tok2 = load_tokenizer(tmp_path / "llama2")
    assert tok2.chat_template == LLAMA2_TEMPLATE and dialog(tok2, MESSAGES) == llama2_dialog(tok, MESSAGES)
    with pytest.raises(ValueError, match=r"chat template: Conversation roles must alternate user/assistant/user/assistant/\.\.\.$"):
        dialog(tok2, [MESSAGES[1], MESSAGES[1], MESSAGES[2]])


def test_a_template_without_bos_counts_exactly_the_answers_and_what_ends_them(tmp_path):
    write_hf_tokenizer(tmp_path, prose(), family="llama2", chat_template=ZEPHYR_TEMPLATE)
    tok2 = load_tokenizer(tmp_path)
    rendered = ("<|system|>\nBe brief.</s><|user|>\nWhere is the ferry?</s><|assistant|>\nAt the quay.</s>"
                "<|user|>\n And the keeper? </s><|assistant|>\nIn the lighthouse.</s>")
    tokens, counted = dialog(tok2, MESSAGES)
    assert tokens == tok2.encode_with_specials(rendered) and tokens.count(tok2.eos_id) == 5 and tok2.bos_id not in tokens
    assert tok2.decode([t for t, c in zip(tokens, counted) if c]) == "At the quay.</s>In the lighthouse.</s>"
    rest = tok2.decode([t for t, c in zip(tokens, counted) if not c])  # " " after </s>: llama2's dummy prefix of a text
    assert rest.startswith("<|system|>\nBe brief.</s> <|user|>") and rest.endswith("And the keeper? </s> <|assistant|>\n")
    asked = prompt(tok2, MESSAGES[:4])
    assert asked == tok2.encode_with_specials(rendered[: rendered.index("In the")]) and asked == tokens[: len(asked)]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}",  # EOS only at the end
    "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",  # a count of messages first
])
def test_a_template_that_renders_a_message_otherwise_as_more_follow_is_refused(tmp_path, template):
    write_hf_tokenizer(tmp_path, prose(), family="llama2", chat_template=template)
    tok2 = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="the chat template is not prefix-stable: "):
        dialog(tok2, MESSAGES)


def test_chat_examples_in_jsonl_take_the_models_format(llama3, tmp_path):
    tok3, _ = llama3
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    data = TokenData.from_files([path], tok3)
    tokens, counted = llama3_dialog(tok3, MESSAGES)
    assert data.tokens.tolist() == tokens and data.counted.tolist() == counted


class Scripted:
    """A model that says a fixed script of tokens whatever it is asked, so generation's own loop
    is what is tested: what it is prompted with and where it stops."""

    def __init__(self, script: list[int], n_words: int):
        self.script, self.n_words, self.args = script, n_words, SimpleNamespace(max_seq_len=512)

    def new_kv_cache(self, batch: int, total: int):
        return None

    def forward_cached(self, tokens: torch.Tensor, pos: int, kv) -> torch.Tensor:
        if pos == 0:
            self.prompt = tokens[0].tolist()
        logits = torch.zeros(1, tokens.shape[1], self.n_words)
        logits[0, -1, self.script[pos + tokens.shape[1] - len(self.prompt)]] = 1.0
        return logits


def test_chat_and_generate_stop_at_the_end_of_a_turn(llama3):
    tok3, n_base = llama3
    eot, end_of_text = n_base + 9, n_base + 1
    said = tok3.encode("At the quay.", bos=False)
    model = Scripted(said + [eot] + tok3.encode(" Anything else?", bos=False), tok3.n_words)
    assert chat(model, tok3, MESSAGES[:2]) == "At the quay." and model.prompt == llama3_prompt(tok3, MESSAGES[:2])
    model = Scripted(said + [end_of_text] + said, tok3.n_words)
    assert generate(model, tok3, "Where?") == "At the quay." and model.prompt == tok3.encode("Where?", bos=True)
    assert generate_ids(model, [5], 2 * len(said) + 1) == said + [end_of_text] + said  # no stop tokens: as many as asked
