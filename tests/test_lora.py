"""LoRA with the base on the SSD (slowft.lora): a step against plain autograd with the adapters as
parametrizations, no unit ever written, the journal resuming bit for bit, merged and PEFT exports."""
import json

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from safetensors.torch import load_file

import slowft
from conftest import tree_hash
from reference import load_meta
from slowft.model import Transformer, cross_entropy
from slowft.tiny import make_tiny_hf

TARGETS = ("wq", "wk", "w2")
MODULES = {"wq": lambda b: b.attention.wq, "wk": lambda b: b.attention.wk, "w2": lambda b: b.feed_forward.w2}


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    tokens = torch.randint(3, 300, (4, 16))
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -1
    return tokens, targets


class LowRank(torch.nn.Module):
    """W + scale * B @ A, as a parametrization of a Linear's weight (the reference's adapter)."""

    def __init__(self, A, B, scale):
        super().__init__()
        self.A, self.B, self.scale = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone()), scale

    def forward(self, W):
        return W + self.scale * self.B @ self.A


def test_a_lora_step_equals_autograd_and_writes_no_unit(gqa_model, tmp_path, batch):
    tokens, targets = batch
    wd = tmp_path / "w"
    with slowft.load(gqa_model, workdir=wd, device="cpu", ram_budget=0, progress=False) as model:
        adapters = model.enable_lora(4, alpha=6.0, targets=TARGETS)
        A0 = {k: v.detach().clone() for k, v in adapters.A.items()}
        assert all(not b.any() for b in adapters.B.values())  # B starts at zero: the model starts as the base
        units_before = {p.name: p.stat().st_mtime_ns for p in (wd / "units").iterdir()}
        losses = [model.step(tokens, targets, slowft.AdamW(lr=1e-2), micro_batch_size=2) for _ in range(2)]
        model.sync()
        assert {p.name: p.stat().st_mtime_ns for p in (wd / "units").iterdir()} == units_before  # the base: never written
        got = {k: (adapters.A[k].detach().clone(), adapters.B[k].detach().clone()) for k in adapters.A}
        logits = model.logits(tokens)
    ref = Transformer(model.args)
    ref.load_state_dict({k: v for k, v in load_meta(gqa_model).items() if k != "rope.freqs"})
    ref.requires_grad_(False)
    lows = {}
    for i, block in enumerate(ref.layers):
        for t in TARGETS:
            linear = MODULES[t](block)
            lows[i, t] = LowRank(A0[i, t], torch.zeros(linear.weight.shape[0], 4), 6.0 / 4)
            parametrize.register_parametrization(linear, "weight", lows[i, t])
    opt = torch.optim.AdamW([p for low in lows.values() for p in (low.A, low.B)], lr=1e-2, weight_decay=0.01)
    for k in range(2):
        opt.zero_grad()
        loss = cross_entropy(ref(tokens), targets)
        loss.backward()
        opt.step()
        assert losses[k] == pytest.approx(loss.item(), rel=1e-5)
    for key, (a, b) in got.items():  # within 1e-5 of each tensor's norm (Adam's first steps amplify last bits elementwise)
        for mine, theirs in ((a, lows[key].A.detach()), (b, lows[key].B.detach())):
            assert (mine - theirs).norm() <= 1e-5 * theirs.norm(), key
        assert b.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(tokens), rtol=1e-4, atol=1e-4)  # inference takes the adapters too


def test_lora_resumes_bit_identically_and_refuses_other_settings(gqa_model, tmp_path, batch):
    tokens, targets = batch

    def run(wd, steps, reopen_after=None):
        for part in ([steps] if reopen_after is None else [reopen_after, steps - reopen_after]):
            with slowft.load(gqa_model, workdir=wd, device="cpu", ram_budget=0, progress=False) as model:
                adapters = model.enable_lora(2, targets=("wv", "w1"), dropout=0.1, seed=3)
                for _ in range(part):
                    model.step(tokens, targets, slowft.AdamW(lr=1e-2), micro_batch_size=2, seed=3)
                model.sync()
                flat = adapters.flat()
        return flat

    whole = run(tmp_path / "a", 3)
    resumed = run(tmp_path / "b", 3, reopen_after=1)
    assert torch.equal(whole, resumed)
    with slowft.load(gqa_model, workdir=tmp_path / "b", device="cpu", progress=False) as model:
        with pytest.raises(slowft.SlowftError, match="holds LoRA adapters made with"):
            model.enable_lora(4, targets=("wv", "w1"))
        with pytest.raises(slowft.SlowftError, match="holds a LoRA run's adapters"):
            model.step(tokens, targets, slowft.AdamW(lr=1e-2))
    with slowft.load(gqa_model, workdir=tmp_path / "full", device="cpu", progress=False) as model:
        model.step(tokens, targets, slowft.SGD(lr=1e-3))
        with pytest.raises(slowft.SlowftError, match="holds a full fine-tune at step 1"):
            model.enable_lora(2)
        for bad, message in [(dict(rank=0), "LoRA: LoRA rank 0"), (dict(rank=2, targets=("wx",)), "unknown LoRA target wx"),
                             (dict(rank=10_000), "above the smallest targeted matrix's dim")]:
            with pytest.raises(slowft.SlowftError, match=message):
                model.enable_lora(**bad)


def test_merged_and_peft_exports(tmp_path, batch):
    """Merged: each targeted matrix changes by a matrix of rank <= R, the rest is bit-identical to
    the source. PEFT's layout loads with peft on the Hugging Face base and gives slowft's logits."""
    tokens, targets = batch
    src = make_tiny_hf(tmp_path / "hf", kv_heads=2, layers=2, dtype="float32")
    with slowft.load(src, workdir=tmp_path / "w", device="cpu", storage_dtype="float32", progress=False) as model:
        model.enable_lora(2, targets=TARGETS)
        for _ in range(2):
            model.step(tokens, targets, slowft.AdamW(lr=1e-2))
        ours = model.logits(tokens)
        model.save(tmp_path / "merged", progress=False)
        model.save_adapters(tmp_path / "adapters")
        model.save_adapters(tmp_path / "adapters")  # an earlier export of adapters is replaced, like a model's
    base, merged = load_file(src / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    changed = {"q_proj", "k_proj", "down_proj"}
    for name, w in base.items():
        if name.split(".")[-2] in changed:
            s = torch.linalg.svdvals(merged[name].double() - w.double())
            assert s[0] > 1e-6 and int((s > s[0] * 1e-5).sum()) <= 2, name
        else:
            assert torch.equal(merged[name], w), name
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0 and sorted(config["target_modules"]) == sorted(changed)
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")  # test dependencies (.ci/run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapters")(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_finetune_lora_flags_and_test_gen_adapters(gqa_model, tmp_path, capsys):
    import finetune
    import test_gen
    from slowft import cli

    def fails(main, *argv):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: main([str(a) for a in argv]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        return err[0]

    common = [gqa_model, "--out", tmp_path / "out", "--workdir", tmp_path / "w", "--steps", 2, "--grad-accum", 2,
              "--batch-size", 2, "--seq-len", 32, "--device", "cpu"]
    before = tree_hash(gqa_model)
    assert "--lora-rank 0: expected a positive integer" in fails(finetune.main, *common, "--lora-rank", "0")
    assert "--lora-rank 999: above the smallest" in fails(finetune.main, *common, "--lora-rank", "999")
    assert "--lora-targets wz: unknown" in fails(finetune.main, *common, "--lora-rank", "2", "--lora-targets", "wq,wz")
    assert "--export-adapters: a LoRA setting; expected it with --lora-rank" in fails(finetune.main, *common, "--export-adapters")
    assert "--optimizer sgd: LoRA's adapters train with AdamW" in fails(finetune.main, *common, "--lora-rank", "2", "--optimizer", "sgd")
    assert "--train-layers: chooses what a full fine-tune trains" in fails(finetune.main, *common, "--lora-rank", "2",
                                                                           "--train-layers", "1-2")
    assert "--freeze-head: chooses what a full fine-tune trains" in fails(finetune.main, *common, "--lora-rank", "2", "--freeze-head")
    assert finetune.main([str(a) for a in common + ["--lora-rank", "2", "--export-adapters", "--lr", "1e-2",
                                                    "--export-dtype", "float32"]]) == 0
    out = capsys.readouterr().out
    written = next(line for line in out.splitlines() if line.startswith("SSD read")).split("wrote")[1]
    assert "lora" in written and "weights" not in written and tree_hash(gqa_model) == before  # no unit written
    assert (tmp_path / "out" / "adapters" / "adapter_model.safetensors").exists()
    assert test_gen.main([str(gqa_model), "cpu", "--adapters", str(tmp_path / "out" / "adapters"), "--max-new-tokens", "4",
                          "--workdir", str(tmp_path / "gen")]) == 0
    with_adapters = capsys.readouterr().out
    assert test_gen.main([str(tmp_path / "out" / "model"), "cpu", "--max-new-tokens", "4", "--workdir", str(tmp_path / "gen2")]) == 0
    assert capsys.readouterr().out == with_adapters  # base + adapters continues as the merged export does


def test_lora_dropout_gradients_equal_autograd_with_the_same_masks(gqa_model, tmp_path, batch):
    """Dropout on the adapters' input, two micro-batches: the adapters' gradients against autograd
    through the model in RAM, the LoRA paths added by forward hooks with the masks slowft draws
    (keyed by seed, step, layer, matrix, micro-batch; the recompute must draw the forward's). An
    AdamW with betas 0 moves each number by exactly lr * g / (|g| + eps): the step's move gives
    the gradient back (a large eps keeps the move small, so the weights stay where they were)."""
    from slowft.model import SeededDropout

    tokens, targets = batch
    lr, eps, p = 1.0, 100.0, 0.3
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        adapters = model.enable_lora(2, targets=("wv", "w1"), dropout=p, seed=4)
        with torch.no_grad():  # B non-zero, so that A has a gradient too
            for b in adapters.B.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(b.numel()))
        start = {k: (adapters.A[k].detach().clone(), adapters.B[k].detach().clone()) for k in adapters.A}
        model.step(tokens, targets, slowft.AdamW(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=0.0), micro_batch_size=2, seed=4)
        moved = {k: tuple((s - now.detach()).double() for s, now in zip(start[k], (adapters.A[k], adapters.B[k])))
                 for k in adapters.A}
    grads = {k: tuple(m * eps / (lr - m.abs()) for m in pair) for k, pair in moved.items()}  # |m| = lr |g| / (|g| + eps)
    ref = Transformer(model.args)
    ref.load_state_dict({k: v for k, v in load_meta(gqa_model).items() if k != "rope.freqs"})
    ref.requires_grad_(False)
    params = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in start.items()}
    drop, micro = SeededDropout(p, 4, 0), [0]  # (scale: alpha / rank, alpha 2 x rank by default)
    for i, block in enumerate(ref.layers):
        for t, linear, name in (("wv", block.attention.wv, "attention.wv.weight"), ("w1", block.feed_forward.w1, "feed_forward.w1.weight")):
            A, B = params[i, t]
            linear.register_forward_hook(lambda m, inp, out, A=A, B=B, i=i, name=name:
                                         out + 2.0 * F.linear(F.linear(drop.apply(inp[0], i, f"lora.{name}", micro[0]), A), B))
    n = (targets >= 0).sum()
    for j in range(2):
        micro[0] = j
        rows = slice(2 * j, 2 * j + 2)
        t = targets[rows].reshape(-1)
        logits = ref(tokens[rows])
        (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.clamp(min=0), reduction="none")[t >= 0].sum() / n).backward()
    for key, (a, b) in params.items():
        for got, want in zip(grads[key], (a.grad.double(), b.grad.double())):  # (fp32 weights: the move's last bits)
            assert (got - want).norm() <= 5e-4 * want.norm() and want.norm() > 0, key
