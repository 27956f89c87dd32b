"""Meta format: resharding in and out, bit-identical round trip, import memory, CodeLlama params."""
import json
import os
import struct
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import slowft
from conftest import PEAK_RSS, run_script, tree_hash
from reference import load_meta
from slowft.atomic import restore_dir


def bits(folder):
    """Every shard's tensors, in file order, as raw bytes (dtype and order included)."""
    out = []
    for p in sorted(folder.glob("consolidated.*.pth")):
        sd = torch.load(p, map_location="cpu", weights_only=True)
        out.append([(k, v.dtype, tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes()) for k, v in sd.items()])
    return out


def crcs_agree(path) -> bool:
    """Every record's data matches its CRC-32, and its data descriptor (Python's zipfile reads
    no descriptor; Go's archive/zip compares it) holds the same CRC."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        if zf.testzip() is not None:
            return False
        for info in zf.infolist():
            if info.flag_bits & 0x08:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                raw.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size)
                descriptor = raw.read(8)
                crc = descriptor[4:8] if descriptor[:4] == b"PK\x07\x08" else descriptor[:4]
                if struct.unpack("<I", crc)[0] != info.CRC:
                    return False
    return True


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_import_reshards_into_full_tensors(tiny, tmp_path, shards):
    src = tiny(dim=64, layers=2, heads=4, kv_heads=2, shards=shards)
    want = load_meta(src)
    before = tree_hash(src)
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        got = dict(model.named_tensors())
        assert set(got) == set(want) - {"rope.freqs"}
        for k, v in got.items():
            assert v.dtype == torch.float32 and torch.equal(v, want[k]), k
        model.save_llama2(tmp_path / "out", progress=False)
    assert bits(tmp_path / "out") == bits(src)  # same shards, dtype, keys, order, bits
    # every zip record's CRC-32 right, as readers that check it (llama.cpp's convert, Go's archive/zip) need
    assert all(crcs_agree(p) for p in (tmp_path / "out").glob("consolidated.*.pth"))
    assert json.loads((tmp_path / "out" / "params.json").read_text()) == json.loads((src / "params.json").read_text())
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert tree_hash(src) == before


def test_export_to_other_shard_counts_and_dtype(tiny, tmp_path):
    src = tiny(dim=64, layers=2, heads=4, kv_heads=2, shards=4)
    want = load_meta(src)
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        for n in (1, 2):
            model.save_llama2(tmp_path / f"s{n}", shards=n, progress=False)
            assert len(list((tmp_path / f"s{n}").glob("consolidated.*.pth"))) == n
            got = load_meta(tmp_path / f"s{n}")
            assert all(torch.equal(got[k], want[k]) for k in want)
        model.save_llama2(tmp_path / "f32", dtype="float32", progress=False)
        sd = torch.load(tmp_path / "f32" / "consolidated.00.pth", weights_only=True)
        assert sd["layers.0.attention.wq.weight"].dtype == torch.float32
        with pytest.raises(slowft.SlowftError, match="does not split"):
            model.save_llama2(tmp_path / "s3", shards=3, progress=False)


def test_reimport_is_reused_and_export_round_trips_through_load(tiny, tmp_path):
    src = tiny(dim=64, layers=2, heads=4, shards=2)
    with slowft.load(src, device="cpu", progress=False) as model:  # default work dir in the cache
        root = model.store.root
        model.save_llama2(tmp_path / "exported", progress=False)
    mtime = (root / "journal.json").stat().st_mtime_ns
    with slowft.load(src, device="cpu", progress=False) as model:
        assert model.store.root == root
    assert (root / "journal.json").stat().st_mtime_ns == mtime  # no second import
    with slowft.load(tmp_path / "exported", device="cpu", progress=False) as model:
        got = dict(model.named_tensors())
    want = load_meta(src)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_untrained_extras_keep_their_own_dtype(tiny, tmp_path):
    """A source whose rope.freqs is fp32 beside bf16 weights gets it back in fp32, bit for bit."""
    src = tiny(dim=64, layers=2, heads=4, shards=2)
    for p in src.glob("consolidated.*.pth"):
        sd = torch.load(p, weights_only=True)
        sd["rope.freqs"] = sd["rope.freqs"].float() / 3  # bits bf16 could not hold
        torch.save(sd, p)
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        model.save_llama2(tmp_path / "out", progress=False)
        model.save_llama2(tmp_path / "f32", dtype="float32", progress=False)
    assert bits(tmp_path / "out") == bits(src)
    got = torch.load(tmp_path / "f32" / "consolidated.00.pth", weights_only=True)
    assert got["rope.freqs"].dtype == torch.float32 and got["norm.weight"].dtype == torch.float32


def test_export_replaces_only_an_earlier_export(tiny, tmp_path, monkeypatch):
    """An export replaces its folder whole: never a folder of the user's, nor one that holds the
    source or the work dir; an earlier export is replaced, and comes back if the swap fails."""
    src = tiny(dim=64, layers=2, heads=4, shards=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        with pytest.raises(slowft.SlowftError, match="holds notes.txt, which an export does not write"):
            model.save_llama2(mine, progress=False)
        with pytest.raises(slowft.SlowftError, match="holds the source model folder"):
            model.save_llama2(src.parent, progress=False)
        with pytest.raises(slowft.SlowftError, match="holds the work dir"):
            model.save_llama2(tmp_path, progress=False)
        model.save_llama2(tmp_path / "out", progress=False)
        first = tree_hash(tmp_path / "out")
        real_replace = os.replace

        def interrupted(a, b):  # Ctrl-C as the new export is moved into place
            if Path(a).name.endswith(".tmp"):
                raise KeyboardInterrupt
            real_replace(a, b)

        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model.save_llama2(tmp_path / "out", progress=False)
        monkeypatch.undo()
        assert tree_hash(tmp_path / "out") == first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "w"]  # no temp or old folder left
        # killed between the two renames: the next export brings the earlier one back, then replaces it
        os.replace(tmp_path / "out", tmp_path / ".out.old-1234abcd")
        (tmp_path / ".out.v2.old-89abcdef").mkdir()  # another export's (out.v2) backup: not ours to touch
        restore_dir(tmp_path / "out")
        assert tree_hash(tmp_path / "out") == first and (tmp_path / ".out.v2.old-89abcdef").is_dir()
        (tmp_path / ".out.v2.old-89abcdef").rmdir()
        model.save_llama2(tmp_path / "out", progress=False)
    assert (mine / "notes.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1
    assert bits(tmp_path / "out") == bits(src)


def test_codellama_style_params(tiny, tmp_path):
    src = tiny(dim=64, layers=2, heads=4, shards=2, rope_theta=1e6, params_vocab=528)
    params = json.loads((src / "params.json").read_text())
    assert params["rope_theta"] == 1e6 and params["vocab_size"] == 528
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        assert model.args.vocab_size == 528 and model.args.rope_theta == 1e6 and model.args.max_seq_len == 16384
        from reference import RefLlama

        tokens = torch.randint(0, 528, (1, 9), generator=torch.Generator().manual_seed(1))
        ref = RefLlama(params, load_meta(src))
        with torch.no_grad():
            assert torch.allclose(model.logits(tokens), ref(tokens), atol=1e-5)


def test_import_peak_rss_stays_near_one_block(tiny, tmp_path):
    """A shard 8 blocks large must not be materialised: import holds about one block at a time."""
    src = tiny(dim=768, layers=8, heads=12, shards=1, multiple_of=256)
    block_fp32 = (4 * 768 * 768 + 3 * 768 * 2048) * 4
    shard = (src / "consolidated.00.pth").stat().st_size
    assert shard > 7 * block_fp32 / 2  # the shard holds 8 blocks (bf16)
    code = PEAK_RSS + textwrap.dedent(f"""
        import torch
        from slowft.checkpoint import import_model
        from slowft.formats.meta import MetaSource
        from slowft.store import Store
        src = MetaSource.open({str(src)!r})
        store = Store({str(tmp_path / 'w')!r})
        print(measure_peak(lambda: import_model(src, store, torch.float32, progress=False))[0])
    """)
    r = run_script("-c", code)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    print(f"import peak RSS growth {growth / 1e6:.1f} MB; block {block_fp32 / 1e6:.1f} MB; shard {shard / 1e6:.1f} MB")
    assert growth < 2.5 * block_fp32  # measured ~1.5 blocks; materialising the shard costs 6
