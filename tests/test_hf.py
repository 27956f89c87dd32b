"""Hugging Face folders in and out (slowft.formats.hf), Llama 3.1's rope scaling and tied embeddings:
logits against an independent forward on the files as Hugging Face stores them, bit-identical
round trips, and a tied model's training step against plain autograd."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slowft
from reference import hf_logits
from slowft.model import ModelArgs, Transformer, cross_entropy
from slowft.tiny import make_tiny_hf

SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """An untied GQA model in several safetensors files; a tied one with Llama 3.1's rope scaling."""
    root = tmp_path_factory.mktemp("hf")
    plain = make_tiny_hf(root / "plain", kv_heads=2, layers=2, max_shard_size=150_000, dtype="float32")
    tied = make_tiny_hf(root / "tied", kv_heads=2, layers=2, tied=True, rope_scaling=SCALING, rope_theta=500000.0)
    return plain, tied


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("which", [0, 1])
def test_logits_equal_hugging_faces_forward_and_round_trips_are_exact(hf_models, tmp_path, which):
    src = hf_models[which]
    assert (len(list(src.glob("*.safetensors"))) > 1) == (which == 0)  # sharded with an index, or one file
    want = hf_logits(src, TOKENS)
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", storage_dtype="float32", progress=False) as model:
        assert model.args.tie_embeddings == bool(which) and (model.args.rope_scaling is not None) == bool(which)
        torch.testing.assert_close(model.logits(TOKENS), want, rtol=1e-5, atol=1e-5)
        model.save(tmp_path / "hf", max_shard_size=150_000 if which == 0 else None, progress=False)  # the source's format and dtype
        model.save(tmp_path / "meta", format="meta", progress=False)
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    assert_same(tensors(src), tensors(tmp_path / "hf"))
    if which == 0:
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors(src))
    else:
        assert "lm_head.weight" not in tensors(tmp_path / "hf")  # exported tied
        assert "output.weight" not in torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params.get("use_scaled_rope", False) == bool(which)
    with slowft.load(tmp_path / "meta", workdir=tmp_path / "w2", device="cpu", progress=False) as model:
        assert model.args.hidden_dim == 160 and model.args.tie_embeddings == bool(which)
        torch.testing.assert_close(model.logits(TOKENS), want, rtol=1e-5, atol=1e-5)
        model.save(tmp_path / "back", format="hf", progress=False)
    assert_same(tensors(src), tensors(tmp_path / "back"))  # HF -> Meta -> HF


def test_a_tied_step_sums_both_uses_and_updates_once(hf_models, tmp_path):
    """The embedding is the output projection too: one update with the sum of both gradients,
    through micro-batches, against autograd on the same tied model in RAM."""
    src = hf_models[1]
    torch.manual_seed(0)
    tokens = torch.randint(3, 200, (4, 12))
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -1
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", storage_dtype="float32", ram_budget=0, progress=False) as model:
        before = dict(model.named_tensors())
        args = model.args
        loss = model.step(tokens, targets, slowft.SGD(lr=0.5), micro_batch_size=2)
        after = dict(model.named_tensors())
    assert "output.weight" not in before and args.tie_embeddings
    ref = Transformer(ModelArgs(**{**args.__dict__}))
    ref.load_state_dict({**before, "output.weight": before["tok_embeddings.weight"]}, strict=False)
    assert ref.output.weight is ref.tok_embeddings.weight
    want = cross_entropy(ref(tokens), targets)
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(after[name], p.detach() - 0.5 * p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_rope_scaling_is_metas(tmp_path):
    from reference import llama3_scaled
    from slowft.model import rope_frequencies

    s = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    plain = rope_frequencies(128, 500000.0)
    scaled = rope_frequencies(128, 500000.0, s)
    torch.testing.assert_close(scaled, llama3_scaled(plain, s), rtol=1e-6, atol=0)
    assert (scaled < plain).any() and (scaled == plain).any()  # the low band slowed, the high one kept


def test_meta_params_of_llama3(tmp_path):
    args = ModelArgs.from_params({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                                  "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0,
                                  "use_scaled_rope": True})
    assert args.hidden_dim == 8192 and args.rope_scaling["factor"] == 8.0 and args.max_seq_len == 131072
    from slowft.formats.meta import params_of
    again = ModelArgs.from_params(params_of(args))
    assert again.hidden_dim == args.hidden_dim and again.rope_scaling == args.rope_scaling


@pytest.fixture
def broken(hf_models, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(hf_models[0], path)
    return path


def test_bad_hugging_face_folders(broken, tmp_path, capsys):
    """Each is one line naming the file, exit 2, the source untouched."""
    import finetune
    from conftest import tree_hash
    from slowft import cli

    def fails(*argv):
        before = tree_hash(broken)
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: finetune.main([str(a) for a in (broken, "--out", tmp_path / "out", "--workdir", tmp_path / "w",
                                                            "--steps", 1, "--grad-accum", 1, *argv)]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert tree_hash(broken) == before
        return err[0]

    assert "--export-format gguf: expected one of meta, hf" in fails("--export-format", "gguf")
    assert "--export-shards 2: Meta's format's; expected --max-shard-size for hf" in fails("--export-shards", "2")
    assert "--max-shard-size: Hugging Face's format's" in fails("--export-format", "meta", "--max-shard-size", "1GB")
    config = json.loads((broken / "config.json").read_text())
    for arch in ("MistralForCausalLM", "Qwen2ForCausalLM"):
        (broken / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
        assert f"config.json: architecture {arch}; expected LlamaForCausalLM" in fails()
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    assert "proj.weight has shape" in (msg := fails()) and "expected the config and tensors of one model" in msg
    (broken / "config.json").write_text(json.dumps(config))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (broken / last).rename(broken / "elsewhere")
    assert f"{broken / last}: missing; model.safetensors.index.json names it" in fails()
    (broken / "elsewhere").rename(broken / last)
    raw = (broken / last).read_bytes()  # a header that lies about a shape: its data no longer fits
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[name]["shape"][0] *= 2
    text = json.dumps(header).encode()
    (broken / last).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    assert f"{broken / last}: unreadable safetensors" in fails()
    (broken / last).write_bytes(raw)
    (broken / "tokenizer.model").rename(broken / "moved")
    assert "tokenizer.json: missing, and no tokenizer.model" in fails()


@pytest.mark.parametrize("which", [0, 1])
def test_an_export_loads_in_transformers_with_slowfts_logits(hf_models, tmp_path, which):
    transformers = pytest.importorskip("transformers")  # a test dependency, installed by .ci/run
    with slowft.load(hf_models[which], workdir=tmp_path / "w", device="cpu", storage_dtype="float32", progress=False) as model:
        model.step(TOKENS[:, :-1], TOKENS[:, 1:], slowft.SGD(lr=0.5))  # weights of slowft's own, not the source's
        ours = model.logits(TOKENS)
        model.save(tmp_path / "out", dtype=torch.float32, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_llama3_in_both_layouts_with_its_tokenizers_and_chat_format(tmp_path):
    """A Llama 3.2-like model (tied, scaled rope, theta 5e5) as Hugging Face ships it (tokenizer.json,
    plus Meta's tiktoken tokenizer.model in original/), exported in Meta's layout: the two folders
    give the same logits, tokens and chat prompt (Llama 3's header tokens, <|eot_id|> ending a turn)."""
    from slowft.chat import prompt
    from slowft.tiny_tokenizers import prose, write_hf_tokenizer, write_tiktoken_model

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_hf_tokenizer(tok_dir, prose(), family="llama3")
    write_tiktoken_model(tok_dir / "tokenizer.model", prose())
    files = {p.name: p.read_bytes() for p in tok_dir.iterdir() if p.name != "tokenizer.model"}
    src = make_tiny_hf(tmp_path / "Llama-3.2-tiny", kv_heads=2, tied=True, rope_scaling=SCALING, rope_theta=500000.0,
                       tokenizer=files)
    (src / "original").mkdir()
    (src / "original" / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the ferry?"}]
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        tok = slowft.load_tokenizer(model.store.root)
        assert model.args.vocab_size == tok.n_words == 512 + 256 and tok.family == "llama3"
        assert tok.token_id("<|eot_id|>") in tok.stop_ids
        ids = prompt(tok, messages)
        assert ids[0] == tok.bos_id == tok.token_id("<|begin_of_text|>") and ids.count(tok.token_id("<|eot_id|>")) == 2
        want = model.logits(torch.tensor([ids]))
        model.save(tmp_path / "meta", format="meta", progress=False)
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["rope_theta"] == 500000.0 and params["use_scaled_rope"] and params["vocab_size"] == 768
    with slowft.load(tmp_path / "meta", workdir=tmp_path / "w2", device="cpu", progress=False) as model:
        meta_tok = slowft.load_tokenizer(model.store.root)
        assert type(meta_tok).__name__ == "Llama3Tokenizer" and prompt(meta_tok, messages) == ids
        torch.testing.assert_close(model.logits(torch.tensor([ids])), want, rtol=0, atol=0)
