"""The learning-rate schedules, and how the optimizers store into a parameter (their arithmetic is
checked against autograd in test_backprop)."""
import math

import pytest
import torch

from slowft.optim import Adalite, SGD, constant_lr, cosine_with_warmup, rows_of


@pytest.mark.parametrize("steps, warmup", [(1, 0), (1, 1), (2, 0), (60, 3), (100, 0), (10, 10)])
def test_cosine_warms_up_then_decays_without_a_step_at_min_lr(steps, warmup):
    lr, min_lr = 1e-3, 1e-4
    at = cosine_with_warmup(lr, steps, warmup, min_lr)
    got = [at(s) for s in range(steps)]
    top = max(0, warmup - 1)
    assert got[:top] == pytest.approx([lr * (s + 1) / warmup for s in range(top)])  # linear warmup
    assert got[top] == pytest.approx(lr)  # then the full lr, once
    assert all(a >= b for a, b in zip(got[top:], got[top + 1:]))  # never rising after
    assert min_lr < got[-1] <= lr  # the last step still trains
    if steps - top > 1:  # halfway through the decay: halfway between lr and min_lr
        mid = at(top + (steps - top) / 2)
        assert mid == pytest.approx((lr + min_lr) / 2)
    assert at(steps + 5) == pytest.approx(min_lr)  # past the end (a longer resumed run): min_lr


def test_constant_and_one_cosine_value():
    assert constant_lr(3e-4)(0) == constant_lr(3e-4)(999) == 3e-4
    assert math.isclose(cosine_with_warmup(1.0, 4)(2), (1 + math.cos(math.pi / 2)) / 2)


# ----------------------------------------------------------------------------- writers

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_fp32_arithmetic_is_unchanged(weight_decay, monkeypatch):
    """fp32 storage keeps the in-place ``add_`` arithmetic bit for bit (what resumed runs expect)."""
    monkeypatch.setattr("slowft.optim.CHUNK_BYTES", 4 * 33 * 5)
    torch.manual_seed(0)
    p, g = torch.randn(40, 33), torch.randn(40, 33)
    want = p.clone()
    want.add_(g.add(want, alpha=weight_decay) if weight_decay else g, alpha=-0.037)
    SGD(0.037, weight_decay).update(p, rows_of(g), {}, 1)
    assert torch.equal(p.view(torch.int32), want.view(torch.int32))


def test_sgd_bf16_computes_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    p, g = torch.randn(16, 8).to(torch.bfloat16), torch.randn(16, 8)
    want = (p.float() - 0.01 * (g + 0.1 * p.float())).to(torch.bfloat16)
    SGD(0.01, 0.1).update(p, rows_of(g), {}, 1)
    assert torch.equal(p, want)


@pytest.mark.parametrize("opt", [SGD(0.01, 0.1), Adalite(0.01)])
def test_every_store_goes_through_the_writer_in_order_of_chunks(opt, monkeypatch):
    monkeypatch.setattr("slowft.optim.CHUNK_BYTES", 4 * 8 * 3)  # 3 rows a chunk
    p0, g = torch.randn(10, 8), torch.randn(10, 8)
    p, calls = p0.clone(), []

    def write(q, a, b, new):
        assert q is p and new.dtype == torch.float32 and new.shape == (b - a, 8)
        calls.append((a, b))
        q[a:b].copy_(new)

    opt.update(p, rows_of(g), opt.init_state(p), 1, write=write)
    assert calls == [(0, 3), (3, 6), (6, 9), (9, 10)]
    q = p0.clone()
    opt.update(q, rows_of(g), opt.init_state(q), 1)
    assert torch.equal(p, q) and not torch.equal(p, p0)
