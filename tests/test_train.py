"""The step driver's plans: micro-batches (gradient accumulation inside the sweep) and trainable
subsets, each checked against plain autograd on the whole batch in RAM, and by the bytes the
step reads and writes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import slowft
from reference import RefLlama, adalite_step, load_meta
from slowft.model import ModelArgs, SeededDropout, Transformer

TOL = dict(rtol=1e-5, atol=1e-6)


def batch(vocab, N=4, T=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (N, T), generator=g)
    targets = torch.randint(0, vocab, (N, T), generator=g)
    targets[0, :4] = -1  # ignored, as slowft's data pads
    targets[N - 1, 2:9] = -100  # ignored, as torch and Hugging Face mark it: micro-batches count differently
    return tokens, targets


def reference_grads(ref: RefLlama, tokens, targets, micro: int, p: float, seed: int, step: int, frozen=()):
    """Plain autograd on the whole batch: the loss is the mean over every counted target of the
    batch; each micro-batch runs with its own dropout masks (slowft's keys)."""
    drop = SeededDropout(p, seed, step) if p else None
    for name, w in ref.named_meta().items():
        w.requires_grad_(not any(name.startswith(f) for f in frozen))
        w.grad = None
    n = (targets >= 0).sum()
    total = 0.0
    for j in range(tokens.shape[0] // micro):
        rows = slice(j * micro, (j + 1) * micro)
        fn = (lambda x, layer, site, j=j: drop.apply(x, layer, site, j)) if drop else None
        logits = ref(tokens[rows], fn)
        t = targets[rows].reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.clamp(min=0), reduction="none")[t >= 0].sum() / n
        loss.backward()
        total += loss.item()
    return total


def assert_same(model, want: dict, start: dict, frozen=()):
    got = dict(model.named_tensors())
    for k, w in want.items():
        torch.testing.assert_close(got[k], w.detach(), **TOL, msg=lambda m, k=k: f"{k}: {m}")
        if any(k.startswith(f) for f in frozen):
            assert torch.equal(got[k], start[k]), f"{k} is frozen but changed"
    moved = max((want[k].detach() - start[k]).abs().max().item() for k in want)
    assert moved > 1e-2  # or this test proves nothing


@pytest.mark.parametrize("micro,dropout,budget", [(1, 0.0, 0), (2, 0.1, 0), (1, 0.1, None), (2, 0.0, "1K")],
                         ids=["4-micro-streaming", "2-micro-dropout", "4-micro-dropout-resident", "2-micro-some-kept"])
def test_sgd_micro_batches_equal_autograd_on_the_whole_batch(gqa_model, tmp_path, micro, dropout, budget):
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ref = RefLlama(params, start)
    tokens, targets = batch(512)
    budget = 1024 * 12 * 64 * 4 if budget == "1K" else budget  # some saved inputs kept, the rest spilled
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=budget, progress=False) as model:
        for step in range(2):
            want = reference_grads(ref, tokens, targets, micro, dropout, seed=3, step=step)
            with torch.no_grad():
                for w in ref.named_meta().values():
                    w -= 2.0 * w.grad
            loss = model.step(tokens, targets, slowft.SGD(lr=2.0), dropout=dropout, seed=3, micro_batch_size=micro)
            assert loss == pytest.approx(want, rel=1e-5)
        assert_same(model, ref.named_meta(), start)


def test_adalite_micro_batches_equal_the_formula(gqa_model, tmp_path):
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ram = Transformer(ModelArgs.from_params(params, vocab_size=512))
    ram.load_state_dict({k: v for k, v in start.items() if k != "rope.freqs"})
    named = dict(ram.named_parameters())
    tokens, targets = batch(512)
    state: dict = {}
    opt = slowft.Adalite(lr=1e-3)
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        for t in range(1, 4):
            ram.zero_grad()
            logits = ram(tokens)
            flat = targets.reshape(-1)
            loss = F.cross_entropy(logits.reshape(-1, 512), flat.clamp(min=0), reduction="none")[flat >= 0].mean()
            loss.backward()
            adalite_step(named, state, t, lr=1e-3)
            assert model.step(tokens, targets, opt, micro_batch_size=1) == pytest.approx(loss.item(), rel=1e-5)
        assert_same(model, {k: v for k, v in named.items()}, start)


def test_adalite_micro_batches_with_dropout(gqa_model, tmp_path):
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ref = RefLlama(params, start)
    named = ref.named_meta()
    tokens, targets = batch(512)
    state: dict = {}
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        for t in range(1, 3):
            want = reference_grads(ref, tokens, targets, 2, 0.1, seed=4, step=t - 1)
            adalite_step(named, state, t, lr=1e-3)
            loss = model.step(tokens, targets, slowft.Adalite(lr=1e-3), dropout=0.1, seed=4, micro_batch_size=2)
            assert loss == pytest.approx(want, rel=1e-5)
        got = dict(model.named_tensors())
    for k, w in named.items():
        torch.testing.assert_close(got[k], w.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_each_unit_is_read_and_written_once_per_step_whatever_the_micro_batches(gqa_model, tmp_path):
    tokens, targets = batch(512, N=8)
    written = {}
    for micro in (8, 1):
        with slowft.load(gqa_model, workdir=tmp_path / f"w{micro}", device="cpu", ram_budget=0, progress=False) as model:
            model.step(tokens, targets, slowft.SGD(lr=0.1))
            model.io.drain()
            before = model.store.stats.snapshot()
            model.step(tokens, targets, slowft.SGD(lr=0.1), micro_batch_size=micro)
            model.io.drain()
            io = model.store.stats.delta(model.store.stats.snapshot(), before)
            weights = sum(model.unit_bytes.values())
            x_bytes = micro * 10 * 64 * 4
            # every block's input, per micro-batch, at --ram-budget 0, and the head's but for the
            # micro-batch in hand; with one micro-batch the top block keeps its graph from the
            # forward instead
            spilled = 2 if micro == 8 else 3 * 8 + 7
            assert io["written"]["weights"] == weights
            assert weights <= io["read"]["weights"] <= 2 * weights
            # each spilled input is written once (a file: the tensor and a small header)
            assert spilled * x_bytes <= io["written"]["inputs"] <= spilled * (x_bytes + 4096)
            written[micro] = io["written"]["weights"]
    assert written[1] == written[8]


@pytest.mark.parametrize("optimizer", ["sgd", "adalite"])
def test_frozen_units_are_read_never_written_and_match_autograd(gqa_model, tmp_path, optimizer):
    """Blocks 1-2 and the head trained: the embedding and block 0 frozen (requires_grad False in
    the reference); the backward stops above block 0: it is not even read again."""
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ref = RefLlama(params, start)
    named = ref.named_meta()
    tokens, targets = batch(512)
    frozen = ("tok_embeddings.", "layers.0.")
    state: dict = {}
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        block0 = model.unit_bytes["layers.0"]
        reads: list[str] = []
        read_unit = model.store.read_unit
        model.store.read_unit = lambda unit, *args: reads.append(unit) or read_unit(unit, *args)
        for t in range(1, 3):
            model.io.drain()
            want = reference_grads(ref, tokens, targets, 2, 0.0, 0, t - 1, frozen)
            trained = {k: v for k, v in named.items() if v.requires_grad}
            if optimizer == "sgd":
                with torch.no_grad():
                    for w in trained.values():
                        w -= 1.0 * w.grad
                opt = slowft.SGD(lr=1.0)
            else:
                adalite_step(trained, state, t, lr=1e-3)
                opt = slowft.Adalite(lr=1e-3)
            before = model.store.stats.snapshot()
            loss = model.step(tokens, targets, opt, micro_batch_size=2, train_layers=[1, 2], train_embedding=False)
            model.io.drain()
            io = model.store.stats.delta(model.store.stats.snapshot(), before)
            assert loss == pytest.approx(want, rel=1e-5)
            unwritten = block0 + model.unit_bytes["tok_embeddings"]
            # the forward's reads only, no recompute (the embedding is read ahead for the next step too)
            assert reads.count("layers.0") == t and reads.count("tok_embeddings") in (t, t + 1), reads
            assert io["written"]["weights"] + io["written"]["optim"] == sum(model.unit_bytes.values()) - unwritten
        versions = model.cache.versions
        assert versions["layers.0"] == versions["tok_embeddings"] == 0 and versions["layers.1"] == 2
        files = {p.name for p in (tmp_path / "w" / "units").iterdir()}
        assert "layers.0.v000000.safetensors" in files and "tok_embeddings.v000000.safetensors" in files
        got = dict(model.named_tensors())
        model.save_llama2(tmp_path / "out", dtype="float32")
    tol = TOL if optimizer == "sgd" else dict(rtol=1e-5, atol=1e-5)
    for k, w in named.items():
        torch.testing.assert_close(got[k], w.detach(), **tol, msg=lambda m, k=k: f"{k}: {m}")
    exported = load_meta(tmp_path / "out")
    for k in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.ffn_norm.weight"):
        assert torch.equal(exported[k], start[k])  # frozen: bit-identical to the source
    from slowft.store import read_safetensors

    state_keys = {k for p in (tmp_path / "w" / "units").glob("layers.0.*") for k in read_safetensors(p)[0] if k.startswith("optim.")}
    assert not state_keys  # no optimizer state for what is not trained


def test_head_only_and_frozen_head(gqa_model, tmp_path):
    tokens, targets = batch(512)
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        first = dict(model.named_tensors())
        model.step(tokens, targets, slowft.SGD(lr=1.0), train_layers=[], train_embedding=False)
        after = dict(model.named_tensors())
        assert not torch.equal(after["output.weight"], first["output.weight"])
        assert all(torch.equal(after[k], first[k]) for k in first if not k.startswith(("output", "norm")))
        model.step(tokens, targets, slowft.SGD(lr=1.0), train_head=False, train_embedding=False)
        last = dict(model.named_tensors())
        assert torch.equal(last["output.weight"], after["output.weight"])
        assert not torch.equal(last["layers.0.attention.wq.weight"], after["layers.0.attention.wq.weight"])


@pytest.mark.parametrize("micro", [None, 1], ids=["one-micro-batch", "two-micro-batches"])
def test_packed_examples_equal_each_example_alone(gqa_model, tmp_path, micro):
    """Rows packed with several examples (segments): attention never crosses from one into the
    next and positions restart with each, through the forward, the recompute and the top block's
    kept graph. The loss and every weight after an SGD step equal plain autograd running each
    example alone (the loss the mean over every counted target of the step)."""
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ram = Transformer(ModelArgs.from_params(params, vocab_size=512))
    ram.load_state_dict({k: v for k, v in start.items() if k != "rope.freqs"})
    g = torch.Generator().manual_seed(7)
    lengths = [[5, 7, 4], [9, 7]]  # two rows of 16
    tokens = torch.randint(0, 512, (2, 16), generator=g)
    targets = torch.randint(0, 512, (2, 16), generator=g)
    targets[0, 4] = targets[1, 8] = -1  # an example's last token: nothing to predict within it
    segments = torch.cat([torch.repeat_interleave(torch.arange(1, len(r) + 1), torch.tensor(r))[None] for r in lengths])
    n = (targets >= 0).sum()
    want = 0.0
    for b in range(2):
        for e in range(1, len(lengths[b]) + 1):
            keep = segments[b] == e
            t = targets[b][keep]
            loss = F.cross_entropy(ram(tokens[b][keep][None])[0], t.clamp(min=0), reduction="none")[t >= 0].sum() / n
            loss.backward()
            want += loss.item()
    with torch.no_grad():
        for p in ram.parameters():
            p -= 1.0 * p.grad
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        got = model.step(tokens, targets, slowft.SGD(lr=1.0), micro_batch_size=micro, segments=segments)
        assert got == pytest.approx(want, rel=1e-5)
        assert_same(model, dict(ram.named_parameters()), start)
        # and not what one unpacked row would give: the mask and the positions matter
        unpacked = model.step(tokens, targets, slowft.SGD(lr=0.0), micro_batch_size=micro)
        packed = model.step(tokens, targets, slowft.SGD(lr=0.0), micro_batch_size=micro, segments=segments)
        assert abs(unpacked - packed) > 1e-3
