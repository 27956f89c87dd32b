"""The regression test: slowft's fused, offloaded step equals plain autograd on the same model in RAM.

Run ``python tests/test_backprop.py`` to rewrite the golden file (from the reference, not slowft).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slowft
from reference import RefLlama, adalite_step, load_meta, loss_fn
from slowft.model import ModelArgs, SeededDropout, Transformer, precompute_rope

GOLDEN = Path(__file__).resolve().parents[1] / "test_data" / "golden_backprop.safetensors"
TOL = dict(rtol=1e-5, atol=1e-6)


def batch(vocab, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :3] = -1  # ignored positions
    return tokens, targets


def reference_step(ref: RefLlama, tokens, targets, p, seed, step, opt):
    """One step of plain autograd with slowft's dropout masks (same (seed, step, layer, site) keys)."""
    drop = SeededDropout(p, seed, step) if p else None
    logits = ref(tokens, (lambda x, layer, site: drop.apply(x, layer, site)) if drop else None)
    loss = loss_fn(logits, targets)
    opt.zero_grad()
    loss.backward()
    return loss.item(), logits.detach()


def assert_same_tensors(model, ref, changed_from=None):
    got = dict(model.named_tensors())
    want = ref.named_meta()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k].detach(), **TOL, msg=lambda m, k=k: f"{k}: {m}")
    if changed_from is not None:  # the step must visibly move the weights, or this test proves nothing
        moved = max((want[k].detach() - changed_from[k]).abs().max().item() for k in want)
        assert moved > 1e-2


# ways through the step: all checked against the same autograd reference
PATHS = {
    "streaming": dict(budget=0),
    "resident": dict(budget=None),
    "head-in-chunks-of-5-tokens": dict(budget=0, logits_chunk=5),
    # more tokens (6 x 12) than dim (64): the head accumulates its matrix's gradient whole
    "head-gradient-accumulated": dict(budget=0, B=6, logits_chunk=5),
    # every update a row (or 10 of a vector) at a time: Adalite's two passes, the head's and the
    # embedding's gradients built slice by slice
    "updates-in-chunks-of-rows": dict(budget=0, update_chunk=40),
    # both: each slice of the head's matrix gradient summed over the kept chunks' logit gradients
    # into one buffer that the next slice reuses
    "head-chunks-and-row-updates": dict(budget=0, logits_chunk=5, update_chunk=40),
}
ADALITE_PATHS = ["streaming", "head-gradient-accumulated", "updates-in-chunks-of-rows", "head-chunks-and-row-updates"]


def set_path(monkeypatch, logits_chunk=None, update_chunk=None, **_):
    if logits_chunk:
        monkeypatch.setattr(slowft.fused, "LOGITS_CHUNK_BYTES", 4 * 512 * logits_chunk)
    if update_chunk:
        monkeypatch.setattr(slowft.optim, "CHUNK_BYTES", update_chunk)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_sgd_step_with_dropout_equals_autograd(gqa_model, tmp_path, monkeypatch, path):
    set_path(monkeypatch, **path)
    budget = path["budget"]
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ref = RefLlama(params, start)
    opt = torch.optim.SGD(ref.parameters(), lr=2.0)
    tokens, targets = batch(512, B=path.get("B", 2))
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=budget, progress=False) as model:
        with torch.no_grad():
            torch.testing.assert_close(model.logits(tokens), ref(tokens), **TOL)
        for step in range(2):
            want_loss, _ = reference_step(ref, tokens, targets, 0.1, seed=3, step=step, opt=opt)
            opt.step()
            loss = model.step(tokens, targets, slowft.SGD(lr=2.0), dropout=0.1, seed=3)
            assert loss == pytest.approx(want_loss, rel=1e-6)
        assert_same_tensors(model, ref, changed_from=start)
        with torch.no_grad():  # logits grew with lr 2: same relative precision, larger absolute values
            torch.testing.assert_close(model.logits(tokens), ref(tokens), rtol=1e-4, atol=1e-4)


def test_sgd_weight_decay_and_untouched_embedding_rows(gqa_model, tmp_path):
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    tokens, targets = batch(512)
    for wd in (0.0, 0.1):
        ref = RefLlama(params, start)
        opt = torch.optim.SGD(ref.parameters(), lr=1.0, weight_decay=wd)
        reference_step(ref, tokens, targets, 0.0, 0, 0, opt)
        opt.step()
        with slowft.load(gqa_model, workdir=tmp_path / f"w{wd}", device="cpu", ram_budget=0, progress=False) as model:
            model.step(tokens, targets, slowft.SGD(lr=1.0, weight_decay=wd))
            assert_same_tensors(model, ref, changed_from=start)
            emb = dict(model.named_tensors())["tok_embeddings.weight"]
        unused = torch.ones(512, dtype=torch.bool)
        unused[tokens.unique()] = False
        same_rows = torch.equal(emb[unused], start["tok_embeddings.weight"][unused])
        assert same_rows == (wd == 0.0)  # plain SGD changes only the rows that were used


@pytest.mark.parametrize("trust", ["update", "gradient"])
@pytest.mark.parametrize("path", [PATHS[k] for k in ADALITE_PATHS], ids=ADALITE_PATHS)
def test_adalite_three_steps_equal_reference_formula(gqa_model, tmp_path, monkeypatch, path, trust):
    """Autograd here runs slowft.model's in-RAM Transformer, and lr is small enough to keep the
    loss falling: Adalite's trust ratio (|p|/|g|) magnifies last-bit differences of another
    forward, and an unstable run turns them into anything. RefLlama checks the architecture above."""
    set_path(monkeypatch, **path)
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ram = Transformer(ModelArgs.from_params(params, vocab_size=512))
    ram.load_state_dict({k: v for k, v in start.items() if k != "rope.freqs"})
    named = dict(ram.named_parameters())
    state: dict = {}
    tokens, targets = batch(512, B=path.get("B", 2))
    # "gradient": the published formula; "update" (slowft's default) moves a tensor by lr of its norm
    lr = {"gradient": 1e-3, "update": 5e-3}[trust]
    opt = slowft.Adalite(lr=lr, trust=trust)
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        for t in range(1, 4):
            ram.zero_grad()
            loss = loss_fn(ram(tokens), targets)
            loss.backward()
            adalite_step(named, state, t, lr=lr, trust=trust)
            assert model.step(tokens, targets, opt) == pytest.approx(loss.item(), rel=1e-5)
        got = dict(model.named_tensors())
    moved = max((named[k].detach() - start[k]).abs().max().item() for k in named)
    assert moved > 1e-2
    for k in named:
        torch.testing.assert_close(got[k], named[k].detach(), **TOL, msg=lambda m, k=k: f"{k}: {m}")
    # the optimizer state lives beside each block, in the block's own file
    from slowft.store import read_safetensors

    files = sorted((tmp_path / "w" / "units").glob("layers.0.v*.safetensors"))
    saved, _ = read_safetensors(files[-1])
    torch.testing.assert_close(saved["optim.attention.wq.weight.c"], state["layers.0.attention.wq.weight"], **TOL)
    torch.testing.assert_close(saved["optim.ffn_norm.weight.v"], state["layers.0.ffn_norm.weight"], **TOL)


def test_bfloat16_compute_tracks_float32(gqa_model, tmp_path):
    tokens, targets = batch(512)
    losses = {}
    for cd in ("float32", "bfloat16"):
        with slowft.load(gqa_model, workdir=tmp_path / cd, device="cpu", compute_dtype=cd, progress=False) as model:
            losses[cd] = [model.step(tokens, targets, slowft.SGD(lr=0.1)) for _ in range(5)]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


def test_step_does_less_arithmetic_than_checkpointed_autograd(gqa_model, tmp_path):
    """What backward needs and no more: a slowft step multiplies exactly what an in-RAM step with
    per-block checkpointing does, less the top block's recompute (its forward keeps its graph).
    torch's checkpoint stops each recompute once backward has what it saved, short of the last
    projection's product (backward needs w2's input, not its output), and so must slowft's.
    Counted with torch's FLOP formulas: matmuls and attention, both directions."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import flop_registry

    params = json.loads((gqa_model / "params.json").read_text())
    args = ModelArgs.from_params(params, vocab_size=512)
    start = load_meta(gqa_model)
    ram = Transformer(args)
    ram.load_state_dict({k: v for k, v in start.items() if k != "rope.freqs"})
    tokens, targets = batch(512)

    aten = torch.ops.aten
    formulas = {**flop_registry, aten.addmm_: flop_registry[aten.addmm],  # (the registry misses these)
                aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    flop_registry[aten._scaled_dot_product_flash_attention_backward]}

    class Counter(TorchDispatchMode):  # FlopCounterMode's module hooks refuse the head's autograd.grad
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in formulas:
                self.total += formulas[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
            return out

    def flops(fn) -> int:
        with Counter() as counter:
            fn()
        return counter.total

    def ram_step():
        logits = ram(tokens, block_fn=lambda b, h, rope: checkpoint(b, h, rope, use_reentrant=False))
        loss_fn(logits, targets).backward()

    rope = precompute_rope(args.head_dim, tokens.shape[1], args.rope_theta)
    block_forward = flops(lambda: ram.layers[0](ram.tok_embeddings(tokens).detach(), rope))
    w2_product = 2 * tokens.numel() * args.dim * args.hidden_dim
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        got = flops(lambda: model.step(tokens, targets, slowft.SGD(lr=0.1)))
    assert got == flops(ram_step) - (block_forward - w2_product)


# ----------------------------------------------------------------------------- golden numbers

GOLDEN_MODEL = dict(dim=32, layers=2, heads=4, kv_heads=2, shards=2, vocab=320, multiple_of=32, seed=11)


def write_golden():
    """Golden tensors from the reference (not slowft): start weights, batch, loss, logits, weights after."""
    import tempfile

    from safetensors.torch import save_file

    from slowft.tiny import make_tiny

    with tempfile.TemporaryDirectory() as d:
        src = make_tiny(Path(d) / "m", **GOLDEN_MODEL)
        params = json.loads((src / "params.json").read_text())
        start = load_meta(src, dtype=torch.float32)
        vocab = start["output.weight"].shape[0]
    ref = RefLlama(params, start)
    opt = torch.optim.SGD(ref.parameters(), lr=2.0)
    tokens, targets = batch(vocab)
    with torch.no_grad():
        logits = ref(tokens)
    loss, _ = reference_step(ref, tokens, targets, 0.1, seed=3, step=0, opt=opt)
    opt.step()
    out = {f"start.{k}": v for k, v in start.items()}
    out.update({f"after.{k}": v.detach() for k, v in ref.named_meta().items()})
    out.update({"tokens": tokens, "targets": targets, "loss": torch.tensor(loss), "logits": logits})
    save_file(out, GOLDEN, metadata={"params": json.dumps(params)})


def test_golden_step(tmp_path):
    from safetensors import safe_open

    from slowft.checkpoint import unit_of
    from slowft.formats.meta import key_order, write_meta_checkpoint
    from slowft.tiny import train_tokenizer

    with safe_open(GOLDEN, "pt") as f:
        params = json.loads(f.metadata()["params"])
        g = {k: f.get_tensor(k) for k in f.keys()}
    start = {k[len("start."):]: v for k, v in g.items() if k.startswith("start.")}
    src = tmp_path / "golden"
    tok = tmp_path / "tok.model"
    train_tokenizer([Path(__file__).resolve().parents[1] / "test_data"], GOLDEN_MODEL["vocab"], tok)
    units: dict = {}
    for k, v in start.items():
        u, n = unit_of(k)
        if u:
            units.setdefault(u, {})[n] = v
    keys = key_order(ModelArgs.from_params(params)) + ["rope.freqs"]
    order = list(dict.fromkeys(unit_of(k)[0] for k in keys if unit_of(k)[0]))
    write_meta_checkpoint(src, ((u, units[u]) for u in order), {k: tuple(v.shape) for k, v in start.items()}, keys,
                          {"rope.freqs": start["rope.freqs"]}, json.dumps(params).encode(), tok, 2, torch.bfloat16)
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        torch.testing.assert_close(model.logits(g["tokens"]), g["logits"], **TOL)
        loss = model.step(g["tokens"], g["targets"], slowft.SGD(lr=2.0), dropout=0.1, seed=3)
        assert loss == pytest.approx(g["loss"].item(), rel=1e-5)
        got = dict(model.named_tensors())
    for k in got:
        torch.testing.assert_close(got[k], g[f"after.{k}"], **TOL, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(GOLDEN.parents[1]))
    write_golden()
    print(f"wrote {GOLDEN}")
