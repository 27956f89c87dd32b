"""Offloaded forward and generation against in-RAM references."""
import json

import pytest
import torch

import slowft
from reference import RefLlama, load_meta
from slowft.generate import generate_ids


@pytest.mark.parametrize("budget", [0, None], ids=["streaming", "resident"])
def test_offloaded_logits_equal_in_ram_reference(gqa_model, tmp_path, budget):
    ref = RefLlama(json.loads((gqa_model / "params.json").read_text()), load_meta(gqa_model))
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=budget, progress=False) as model:
        got = model.logits(tokens)
        assert model.cache.resident == (budget is None)
    with torch.no_grad():
        want = ref(tokens)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (2, 13, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_equals_recompute(gqa_model, tmp_path):
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        prompt = [1, 37, 5, 99, 240]
        cached = generate_ids(model, prompt, 12)
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model.logits(torch.tensor([seq]))[0, -1].argmax()))
        assert cached == seq[len(prompt):]
        # last position's logits through the cache equal the full recompute
        kv = model.new_kv_cache(1, len(seq))
        model.forward_cached(torch.tensor([seq[:-1]]), 0, kv)
        step = model.forward_cached(torch.tensor([seq[-1:]]), len(seq) - 1, kv)[0, -1]
        torch.testing.assert_close(step, model.logits(torch.tensor([seq]))[0, -1], rtol=1e-5, atol=1e-5)


def test_generate_text_and_sampling(gqa_model, tmp_path):
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        tok = slowft.Tokenizer(model.store.path("tokenizer.model"))
        greedy = slowft.generate(model, tok, "The baker", 8)
        assert greedy == slowft.generate(model, tok, "The baker", 8)
        a = slowft.generate(model, tok, "The baker", 8, temperature=1.0, top_p=0.9, seed=5)
        assert a == slowft.generate(model, tok, "The baker", 8, temperature=1.0, top_p=0.9, seed=5)
        assert isinstance(greedy, str) and greedy


def test_auto_storage_dtype_reuses_an_import_and_else_keeps_the_sources(gqa_model, tmp_path):
    """test_gen.py's choice: a work dir that holds this source already (finetune.py's, float32)
    is used as it is; a new import keeps the source's bf16 (exact, half the disk)."""
    slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", progress=False).close()
    with slowft.load(gqa_model, workdir=tmp_path / "w", storage_dtype="auto", device="cpu", progress=False) as model:
        assert model.meta["storage_dtype"] == "float32"
    with slowft.load(gqa_model, workdir=tmp_path / "new", storage_dtype="auto", device="cpu", progress=False) as model:
        assert model.meta["storage_dtype"] == "bfloat16"
        assert all(t.dtype == torch.bfloat16 for _, t in model.named_tensors())
