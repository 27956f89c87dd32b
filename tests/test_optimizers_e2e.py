"""AdamW and AdaLomo through the real offloaded step: slowft's fused, streamed update equals the
whole model trained in RAM by plain autograd and an unfused optimizer (torch.optim.AdamW; AdaLomo's
formula applied densely, test_optim.adalomo_step), weight for weight and loss for loss, over three
steps; with the batch run as one micro-batch per row (gradient accumulation) as well.

Every weight is streamed (ram_budget 0), so the optimizer state is written into each unit's file
and read back the next step: the test also compares it, as saved, with the reference's.
"""
from __future__ import annotations

import json

import pytest
import torch

import slowft
from reference import load_meta, loss_fn
from slowft.model import ModelArgs, Transformer
from slowft.optim import AdaLomo, AdamW
from slowft.store import read_safetensors
from test_optim import adalomo_step

VOCAB = 512
# fp32 tolerance, as test_backprop's: the fused step's gradients come from other kernels (sliced
# matmuls, a hand-made head) and differ from autograd's in the last bits, ~1e-10 absolute here
# (gradients ~1e-3, some summed from terms far larger than themselves). AdaLomo divides by row and
# column means, smooth in the gradient: those differences reach its updates as they are. AdamW's
# first update is lr * g / (|g| + eps), nearly lr * sign(g): a gradient element that is ~0 by
# cancellation turns its last-bit difference d into up to lr * d / eps, so the test runs AdamW with
# eps 1e-5 (torch's default 1e-8 would allow 1e-3 of noise to move a weight by 1e-5; test_optim
# checks the default eps against torch on equal gradients): the largest difference is then ~2e-7.
# atol stays below lr * weight_decay * |w| (1e-4 * ~0.03) so a weight decay bug is caught.
TOL = dict(rtol=1e-5, atol=1e-6)


def batch(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    targets[0, :3] = -1  # ignored positions
    return tokens, targets


class TorchAdamW:
    def __init__(self, params: dict, lr, **kw):
        self.opt = torch.optim.AdamW(params.values(), lr=lr, foreach=False, **kw)
        self.params = params

    def step(self, t):
        self.opt.step()

    def state(self, name: str) -> dict:
        s = self.opt.state[self.params[name]]
        return {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}


class DenseAdaLomo:
    def __init__(self, params: dict, lr, **kw):
        self.params, self.lr, self.kw, self.moments = params, lr, kw, {}

    def step(self, t):
        adalomo_step(self.params, self.moments, t, self.lr, **self.kw)

    def state(self, name: str) -> dict:
        m = self.moments[name]
        return {"r": m[0], "c": m[1]} if isinstance(m, tuple) else {"v": m}


CASES = {
    "adamw": (lambda: AdamW(1e-3, eps=1e-5, weight_decay=0.1),
              lambda params: TorchAdamW(params, 1e-3, eps=1e-5, weight_decay=0.1)),
    "adalomo": (lambda: AdaLomo(1e-2, weight_decay=0.1), lambda params: DenseAdaLomo(params, 1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("micro", [None, 1], ids=["one-batch", "micro-batches-of-1"])
@pytest.mark.parametrize("name", CASES)
def test_three_offloaded_steps_equal_the_dense_optimizer(gqa_model, tmp_path, monkeypatch, name, micro):
    """Updates 5 rows of a [., 64] matrix at a time: AdaLomo's two passes, the head's
    and the embedding's gradients built slice by slice, AdamW's state read and written in chunks."""
    monkeypatch.setattr(slowft.optim, "CHUNK_BYTES", 4 * 64 * 5)
    make, make_ref = CASES[name]
    params = json.loads((gqa_model / "params.json").read_text())
    start = load_meta(gqa_model)
    ram = Transformer(ModelArgs.from_params(params, vocab_size=VOCAB))
    ram.load_state_dict({k: v for k, v in start.items() if k != "rope.freqs"})
    named = dict(ram.named_parameters())
    ref = make_ref(named)
    opt = make()
    tokens, targets = batch()
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=0, progress=False) as model:
        for t in range(1, 4):
            ram.zero_grad()
            loss = loss_fn(ram(tokens), targets)
            loss.backward()
            ref.step(t)
            assert model.step(tokens, targets, opt, micro_batch_size=micro) == pytest.approx(loss.item(), rel=1e-5)
        got = dict(model.named_tensors())
    assert set(got) == set(named)
    moved = max((named[k].detach() - start[k]).abs().max().item() for k in named)
    assert moved > 2e-3  # the steps visibly move the weights, or this test proves nothing
    for k in named:
        torch.testing.assert_close(got[k], named[k].detach(), **TOL, msg=lambda m, k=k: f"{k}: {m}")
    # the optimizer's state, as saved beside the weights in each unit's file
    units = tmp_path / "w" / "units"
    for unit, weight, full in [("layers.0", "attention.wq.weight", "layers.0.attention.wq.weight"),
                               ("layers.2", "ffn_norm.weight", "layers.2.ffn_norm.weight"),
                               ("head", "output.weight", "output.weight"),
                               ("tok_embeddings", "weight", "tok_embeddings.weight")]:
        saved, _ = read_safetensors(sorted(units.glob(f"{unit}.v*.safetensors"))[-1])
        want = ref.state(full)
        assert {k for k in saved if k.startswith(f"optim.{weight}.")} == {f"optim.{weight}.{k}" for k in want}
        for k, v in want.items():
            torch.testing.assert_close(saved[f"optim.{weight}.{k}"], v, **TOL, msg=lambda m, k=k: f"{full} {k}: {m}")
