"""load_tokenizer over the three files llama models ship: sentencepiece, Llama 3's tiktoken and a
Hugging Face tokenizer.json, each in its real format, behind one interface."""
import json
import shutil

import numpy as np
import pytest
import regex

from slowft.errors import SlowftError
from slowft.tiny import TEST_DATA, train_tokenizer
from slowft.tiny_tokenizers import prose, write_hf_tokenizer, write_tiktoken_model
from slowft.tokenizer import Tokenizer, load_tokenizer
from slowft.bpe import LLAMA3_PATTERN, meta_pieces

TEXT = "The keeper's lamp was lit at dusk.\n\n  Café ☕, 1234567 ferries; ÉTÉ!\tend "


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per kind, and the tiktoken file's count of ranks (Meta's specials follow them)."""
    root = tmp_path_factory.mktemp("tokenizers")
    made = {kind: root / kind for kind in ("sentencepiece", "tiktoken", "hf-llama3", "hf-llama2")}
    for folder in made.values():
        folder.mkdir()
    train_tokenizer([TEST_DATA], 512, made["sentencepiece"] / "tokenizer.model")
    n_words = write_tiktoken_model(made["tiktoken"] / "tokenizer.model", prose())
    assert write_hf_tokenizer(made["hf-llama3"], prose()) == n_words  # the same texts and size: the same vocabulary
    write_hf_tokenizer(made["hf-llama2"], prose(), family="llama2")
    return made, n_words - 256


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf-llama3", "hf-llama2"])
def test_each_kind_round_trips_with_its_own_special_tokens(folders, kind):
    made, n_base = folders
    tok = load_tokenizer(made[kind])
    llama3 = kind in ("tiktoken", "hf-llama3")
    assert type(tok).__name__ == {"sentencepiece": "Tokenizer", "tiktoken": "Llama3Tokenizer"}.get(kind, "HFTokenizer")
    assert tok.family == ("llama3" if llama3 else "llama2") and tok.chat_template is None
    if llama3:  # Meta's: <|begin_of_text|> and <|end_of_text|> right after the ranks, <|eot_id|> ends a turn
        assert (tok.n_words, tok.bos_id, tok.eos_id, tok.stop_ids) == (n_base + 256, n_base, n_base + 1, {n_base + 1, n_base + 9})
        assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    else:  # llama2's: <unk> 0, <s> 1, </s> 2
        assert (tok.n_words, tok.bos_id, tok.eos_id, tok.stop_ids) == (512, 1, 2, {2})
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.files == ([made[kind] / "tokenizer.model"] if kind in ("sentencepiece", "tiktoken")
                         else [made[kind] / "tokenizer.json", made[kind] / "tokenizer_config.json"])
    for text in prose() + [TEXT]:
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text and tok.bos_id not in ids
        assert text == TEXT or len(ids) < len(text) / 2  # the prose it learned from: pieces, not bytes
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]  # one BOS, however the file adds its own
        long = tok.encode_long(text, bos=True, eos=True)
        assert long.dtype == np.int32 and long.tolist() == [tok.bos_id] + ids + [tok.eos_id]


def test_metas_and_hugging_faces_llama3_files_encode_alike(folders):
    """The same BPE as Meta ships it (tiktoken) and as Hugging Face converts it: the same tokens,
    Meta's special tokens at the same ids."""
    made, n_base = folders
    meta, hf = load_tokenizer(made["tiktoken"]), load_tokenizer(made["hf-llama3"])
    for text in prose() + [TEXT, "don't WE'LL it's   \n\n\n x 12345 <<|x|>>"]:
        assert meta.encode(text) == hf.encode(text)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_4|>", "<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    for tok in (meta, hf):
        assert [tok.token_id(t) for t in specials] == list(range(n_base, n_base + 256))
        assert tok.token_id("<|reserved_special_token_251|>") is None and tok.token_id("<|python_tag|>") is None


@pytest.mark.parametrize("kind,special", [("tiktoken", "<|eot_id|>"), ("hf-llama3", "<|eot_id|>"), ("hf-llama2", "</s>"),
                                          ("sentencepiece", "</s>")])
def test_special_tokens_typed_in_text_stay_text(folders, kind, special):
    """A user's "<|eot_id|>" is characters, not the end of a turn; a rendered chat template's is the token."""
    tok = load_tokenizer(folders[0][kind])
    text = f"Say {special} twice: {special}"
    ids = tok.encode(text, bos=False)
    assert tok.token_id(special) not in ids and tok.decode(ids) == text
    marked = tok.encode_with_specials(f"Say{special}now")
    assert marked.count(tok.token_id(special)) == 1
    assert tok.decode(marked[: marked.index(tok.token_id(special))]) == "Say"


def test_metas_split_pattern_and_cuts_of_long_runs():
    """Meta's pattern: contractions of any case, numbers 3 digits at a time, newlines on their own.
    Meta's _split_whitespaces_or_nonwhitespaces: a run over 25,000 characters every 25,000 from
    its start; a new run starts the count again."""
    assert regex.findall(LLAMA3_PATTERN, "I'M here, SHE'SOK pay 1234567 at\n\n  dusk!!\n") == [
        "I", "'M", " here", ",", " SHE", "'S", "OK", " pay", " ", "123", "456", "7", " at", "\n\n", " ", " dusk", "!!\n"]
    text = "a" * 30_000 + " " * 60_000 + "b" * 10
    assert [len(p) for p in meta_pieces(text)] == [25_000, 30_000, 25_000, 10_010]
    assert [len(p) for p in meta_pieces("x" * 400_010)] == [25_000] * 16 + [10]  # 400,000 a chunk, cut within each
    assert "".join(meta_pieces(text)) == text and list(meta_pieces("short one")) == ["short one"]


def test_tokenizer_config_names_the_special_tokens_and_the_chat_template(folders, tmp_path):
    made, n_base = folders
    for kind, own in (("hf-llama3", (n_base, n_base + 1)), ("hf-llama2", (1, 2))):  # without one: tokenizer.json's own
        folder = copy_of(made[kind], tmp_path / "bare")
        (folder / "tokenizer_config.json").unlink()
        tok = load_tokenizer(folder)
        assert (tok.bos_id, tok.eos_id, tok.files) == (*own, [folder / "tokenizer.json"])
    folder = copy_of(made["hf-llama3"], tmp_path)  # as Llama 3 Instruct's: a turn ends the text
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>", "add_bos_token": False,
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (n_base, n_base + 9, {n_base + 1, n_base + 9})
    assert tok.encode("hi", bos=True, eos=True) == tok.encode("hi", bos=False) + [n_base + 9]  # add_bos_token: false
    assert tok.chat_template == "chat"
    sp = copy_of(made["sentencepiece"], tmp_path)  # a sentencepiece folder reads one too
    (sp / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    (sp / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # where newer transformers saves it
    tok = load_tokenizer(sp)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat_template) == (1, 0, {0}, "{{ messages[0]['content'] }}")
    assert tok.files == [sp / "tokenizer.model", sp / "tokenizer_config.json", sp / "chat_template.jinja"]
    assert (Tokenizer(sp / "tokenizer.model").eos_id, Tokenizer(sp / "tokenizer.model").files) == (2, [sp / "tokenizer.model"])


@pytest.mark.parametrize("kind,file,content,message", [
    (None, None, None, "{folder}/tokenizer.json: missing, and no tokenizer.model; expected this model's tokenizer"),
    ("hf-llama3", "tokenizer.json", '{"model": {"type": "BPE"',
     "{folder}/tokenizer.json: not a readable Hugging Face tokenizer.json ("),
    ("tiktoken", "tokenizer.model", "\x00\x01garbage\nmore",
     "{folder}/tokenizer.model: not a readable sentencepiece model, nor a tiktoken BPE file (line 1 "),
    ("tiktoken", "tokenizer.model", "IQ== 0\nIg== 2\n", "{folder}/tokenizer.model: tiktoken ranks are not 0..n-1"),
    ("hf-llama2", "tokenizer_config.json", "{'bos_token': 1}", "{folder}/tokenizer_config.json: not readable JSON ("),
    ("tiktoken", "tokenizer_config.json", '{"bos_token": "<s>"}',
     "{folder}/tokenizer_config.json: bos_token '<s>' is not a token of {folder}/tokenizer.model"),
    ("hf-llama2", "tokenizer_config.json", '{"eos_token": 2}', "{folder}/tokenizer_config.json: eos_token is 2; expected a token string"),
    ("sentencepiece", "tokenizer_config.json", '{"add_bos_token": "yes"}',
     "{folder}/tokenizer_config.json: add_bos_token is 'yes'; expected true or false"),
    ("hf-llama3", "tokenizer_config.json", '{"chat_template": [{"name": "rag", "template": "x"}]}',
     "{folder}/tokenizer_config.json: chat_template has templates ['rag'] but none named 'default'"),
])
def test_bad_tokenizer_files_are_one_line_naming_the_file(folders, tmp_path, kind, file, content, message):
    folder = copy_of(folders[0][kind], tmp_path) if kind else tmp_path
    if file:
        (folder / file).write_text(content)
    with pytest.raises(SlowftError) as e:
        load_tokenizer(folder)
    assert message.format(folder=folder) in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_without_eos_asks_for_one(folders, tmp_path):
    folder = tmp_path / "bare"
    write_hf_tokenizer(folder, prose(), family="llama2")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]  # </s> only a vocabulary entry
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(SlowftError, match=f"{folder}/tokenizer.json: has no EOS token .*; expected eos_token in {folder}/tokenizer_config"):
        load_tokenizer(folder)
