"""The step's plan and its projected SSD writes: checked against what steps really write."""
from __future__ import annotations

import pytest
import torch

import slowft
from slowft.model import ModelArgs
from slowft.plan import Layout, lisa_layers, plan_step, projected_writes


def test_plans_and_lisa():
    assert plan_step(4, 8, 2).n_micro == 4
    assert plan_step(4, 8, None, train_layers=[2], train_embedding=False).stop == 1 + 2  # head, 3, 2
    for bad in [dict(micro_batch_size=3), dict(micro_batch_size=0), dict(train_layers=[4]),
                dict(train_layers=[], train_embedding=False, train_head=False)]:
        with pytest.raises(slowft.SlowftError):
            plan_step(4, 8, **bad)
    picks = [lisa_layers(2, 8, seed=1, step=s) for s in range(20)]
    assert all(len(set(p)) == 2 and all(0 <= i < 8 for i in p) for p in picks)
    assert picks == [lisa_layers(2, 8, seed=1, step=s) for s in range(20)]  # a function of (seed, step)
    assert len({tuple(p) for p in picks}) > 5
    with pytest.raises(slowft.SlowftError):
        lisa_layers(9, 8, 0, 0)


LLAMA2_13B = ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000)


def per_token(args, storage, micro, accum, seq, budget=0, optimizer=None):
    layout = Layout.estimate(args, storage, torch.float32, budget)
    plan = plan_step(args.n_layers, micro * accum, micro)
    w = projected_writes(layout, optimizer or slowft.Adalite(lr=1e-5), plan, seq)
    return sum(w.values()) / (micro * accum * seq), w


def test_the_default_run_at_13b_writes_under_3_mb_per_trained_token():
    """finetune.py's defaults (bf16 storage, 32 micro-batches of 4 x 256) against the single
    micro-batch in fp32 of before, at --ram-budget 0: nothing but the unit in hand kept in RAM."""
    import finetune

    a = finetune.parse_args(["some-model"])
    now, parts = per_token(LLAMA2_13B, getattr(torch, a.storage_dtype), a.batch_size, a.grad_accum, a.seq_len)
    before, _ = per_token(LLAMA2_13B, torch.float32, 4, 1, 256)
    assert now <= 3e6, parts
    assert 45e6 < before < 60e6  # the issue's ~51 MB: the projection sees what the issue measured
    # with the RAM to keep the flowing activations, less
    assert per_token(LLAMA2_13B, torch.bfloat16, 4, 32, 256, budget=4 << 30)[0] < now


@pytest.mark.parametrize("kw", [dict(micro=2, budget=0), dict(micro=1, budget=0), dict(micro=1, budget=1 << 16),
                                dict(micro=4, budget=0, train_layers=[1], train_embedding=False),
                                dict(micro=1, budget=0, train_head=False)],
                         ids=["1-micro", "4-micro", "4-micro-some-kept", "frozen-below", "frozen-head"])
def test_projection_is_what_a_step_writes(gqa_model, tmp_path, kw):
    """Every byte of a streaming step, by kind, as projected from the shape alone (the first
    step adds the optimizer's state to each file: projected too)."""
    budget, micro = kw.pop("budget"), kw.pop("micro")
    tokens = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = slowft.Adalite(lr=1e-3)
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", ram_budget=budget, progress=False) as model:
        plan = plan_step(model.args.n_layers, 4, micro, **kw)
        estimated = projected_writes(Layout.estimate(model.args, torch.float32, torch.float32, budget), opt, plan, 16)
        for step in range(2):
            projected = projected_writes(model.layout(), opt, plan, 16)
            model.io.drain()
            before = model.store.stats.snapshot()
            model.step(tokens, tokens, opt, micro_batch_size=micro, **kw)
            model.io.drain()
            written = model.store.stats.delta(model.store.stats.snapshot(), before)["written"]
            journal = written.pop("journal")
            assert written == {k: v for k, v in projected.items() if k != "journal"}
            assert journal == pytest.approx(projected["journal"], rel=0.2)  # a journal: its JSON, about
    for k in ("weights", "optim", "inputs", "grads"):
        assert estimated[k] == pytest.approx(projected[k], rel=0.01)
