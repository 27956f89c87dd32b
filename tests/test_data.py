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
