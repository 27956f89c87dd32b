"""llama2's chat format as Meta's chat_completion builds it, and JSONL examples with prompt masking."""
import json

import pytest
import torch

from slowft.chat import llama2_dialog, llama2_prompt
from slowft.data import TokenData
from slowft.errors import SlowftError
from slowft.tokenizer import Tokenizer


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
