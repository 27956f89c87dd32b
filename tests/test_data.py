"""Training text: long files tokenized a piece at a time to the same tokens, folders as users have them."""
import torch

from slowft import tokenizer as tokenizer_module
from slowft.data import TokenData
from slowft.tiny import TEST_DATA
from slowft.tokenizer import Tokenizer


def test_a_long_text_is_tokenized_in_pieces_to_the_whole_texts_tokens(tiny, tmp_path, monkeypatch):
    tok = Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")
    text = "".join(p.read_text() for p in sorted(TEST_DATA.glob("*.txt"))) * 3
    (tmp_path / "notes.txt").write_text(text)
    whole = TokenData.from_files([tmp_path / "notes.txt"], tok)
    assert tok._splits_at_newlines  # so the pieces below are taken
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 50)  # dozens of pieces
    pieces = TokenData.from_files([tmp_path / "notes.txt"], tok)
    assert torch.equal(pieces.tokens, whole.tokens) and pieces.fingerprint() == whole.fingerprint()
    assert pieces.tokens.tolist() == tok.encode(text, bos=True, eos=True)
    assert pieces.tokens.dtype == torch.int32  # 4 bytes a token held
    tokens, targets = pieces.batch(0, 2, 16)
    assert tokens.dtype == targets.dtype == torch.int64 and torch.equal(tokens[:, 1:], targets[:, :-1])


def test_a_folder_stands_for_its_visible_txt_files(tiny, tmp_path):
    tok = Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")
    (tmp_path / "notes.txt").write_text("The keeper of the north light.\n")
    (tmp_path / "._notes.txt").write_bytes(b"\0\5\26\7binary resource fork")  # left by macOS on some drives
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0")
    data = TokenData.from_files([tmp_path], tok)
    assert data.sources == [tmp_path / "notes.txt"]


def test_held_out_documents_by_seed(tiny, tmp_path):
    """--val-fraction holds out whole documents, the same ones for the same seed."""
    import pytest

    from slowft.errors import SlowftError

    tok = Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")
    docs = []
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text(f"Document {i}: " + "the lamp was lit at dusk. " * (i + 1))
        docs.append(tmp_path / f"d{i}.txt")
    data = TokenData.from_files(docs, tok)
    train, val = data.split(0.2, seed=3)
    assert len(val.sources) == 2 and set(train.sources) | set(val.sources) == set(docs)
    assert not set(train.sources) & set(val.sources)
    assert len(train) + len(val) == len(data)
    for part in (train, val):  # each document whole: its own tokens, BOS first and EOS last
        for f, toks in zip(part.sources, part.tokens.split(part.lengths)):
            assert toks.tolist() == tok.encode(f.read_text(), bos=True, eos=True)
    assert data.split(0.2, seed=3)[1].sources == val.sources  # a resumed run holds out the same
    x, y = val.windows(8)
    assert x.shape == y.shape and torch.equal(x.flatten()[1:], y.flatten()[:-1])
    with pytest.raises(SlowftError, match="has 1 document"):
        TokenData.from_files([docs[0]], tok).split(0.5, 0)


def test_mixed_data_packs_text_pieces_beside_whole_examples(tiny, tmp_path):
    """Text beside JSONL: each text document goes into rows as pieces of at most a row (each
    token a target once), each example whole, in an order drawn by (seed, step); text alone
    keeps its windows of the stream."""
    import json
    from argparse import Namespace

    import finetune

    tok = Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")
    (tmp_path / "notes.txt").write_text("The keeper of the north light climbed the hundred steps. " * 8)
    qa = [("Who bakes?", "The baker."), ("What does rye bread cost?", "Two coins.")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                             "content": a}]}) + "\n" for q, a in qa))
    data = TokenData.from_files([tmp_path], tok)
    parts = list(zip(data.tokens.split(data.lengths), data.counted.split(data.lengths), data.sources))
    doc = next(t for t, _, f in parts if f.suffix == ".txt")
    examples = [(t, c) for t, c, f in parts if f.suffix == ".jsonl"]
    seq = 48
    assert data.examples and len(doc) > 3 * seq and data.truncated(seq) == 0
    x, y, seg = data.packed_rows(seq)
    found = []
    for row in range(x.shape[0]):
        for s in seg[row].unique().tolist():
            at = seg[row] == s
            if s == 0:  # padding: nothing counts
                assert (y[row][at] == -1).all()
                continue
            found.append((x[row][at].tolist(), y[row][at].tolist()))
    # the document: pieces of at most a row, each the next's first token its last target
    pieces = [p for p in found if p[0] not in [e[:-1].tolist() for e, _ in examples]]  # (in order: packed_rows keeps it)
    text_inputs = [t for p in pieces for t in p[0]]
    text_targets = [t for p in pieces for t in p[1]]
    assert text_inputs == doc[:-1].tolist() and text_targets == doc[1:].tolist()
    assert all(len(p[0]) <= seq for p in pieces) and len(pieces) == -(-(len(doc) - 1) // seq)
    # each example whole in a row of its own segment, its prompt's targets not counted
    for e, counted in examples:
        want_y = e[1:].masked_fill(~counted[1:], -1).tolist()
        assert [(e[:-1].tolist(), want_y)] == [p for p in found if p[0] == e[:-1].tolist()]
    assert len(found) == len(pieces) + len(examples)  # every span once
    # training rows: a pure function of (seed, step)
    a = Namespace(batch_size=2, grad_accum=2, seq_len=seq, seed=3)
    first = finetune.batch_of(data, a, 5)
    assert all(torch.equal(p, q) for p, q in zip(first, finetune.batch_of(data, a, 5)))
    assert not torch.equal(first[0], finetune.batch_of(data, a, 6)[0])
    assert first[0].shape == (4, seq) and first[2] is not None
    text = TokenData.from_files([tmp_path / "notes.txt"], tok)
    windows = finetune.batch_of(text, a, 5)
    assert windows[2] is None and all(torch.equal(p, q) for p, q in zip(windows, text.batch(5, 4, seq, 3)))


def test_packed_data_needs_an_example_that_fits_not_a_rows_worth_of_tokens(tiny, tmp_path):
    """Packed rows take a few short examples (fewer tokens than a row), but not a set whose every
    example is cut to fit: its answers could be cut off whole."""
    import json
    import re

    import pytest

    from slowft.errors import SlowftError

    tok = Tokenizer(tiny(dim=64, layers=2, heads=4) / "tokenizer.model")
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"prompt": "Where is the ferry?", "completion": " At the quay."}) + "\n")
    data = TokenData.from_files([path], tok, flag="--val-data")
    data.check(seq_len=len(data) - 1)
    data.check(seq_len=4 * len(data))  # (windows would need a stream longer than a row)
    want = f"--val-data {path}: no example fits in --seq-len 4 (the shortest needs --seq-len {len(data) - 1})"
    with pytest.raises(SlowftError, match=re.escape(want)):
        data.check(seq_len=4)
