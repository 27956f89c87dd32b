"""Stochastic rounding to bf16: unbiased, reproducible, and what keeps small updates from being lost."""
import math

import pytest
import torch

from slowft.optim import SGD, AdaLomo, Adalite, AdamW, rows_of
from slowft.rounding import generator_for, nearest, stochastic, stochastic_round


def neighbours(x: torch.Tensor):
    """The bf16 values either side of fp32 ``x`` (lower magnitude, higher magnitude), as fp32."""
    lo = x.float().view(torch.int32) & -65536
    return lo.view(torch.float32), (lo + 65536).view(torch.float32)


@pytest.mark.parametrize("value", [
    1.0 + 0.1 * 2 ** -7, 1.0 + 0.25 * 2 ** -7, 1.0 + 0.5 * 2 ** -7, 1.0 + 0.9 * 2 ** -7,
    -3.3, -1.0 - 0.75 * 2 ** -7, 1e-30, -2.5e-39, 12345.678, 1.0])
def test_the_mean_of_many_roundings_is_the_value(value):
    n = 20_000
    x = torch.full((n,), value, dtype=torch.float32)
    got = stochastic_round(x, generator_for(0, 0, "u", "t", "cpu"))
    assert got.dtype == torch.bfloat16
    lo, hi = neighbours(x[:1])
    lo, hi, v = lo.item(), hi.item(), x[0].item()
    up = got.float() == hi
    assert ((got.float() == lo) | up).all()  # always one of the two neighbours
    spacing = abs(hi - lo)
    if lo == v:  # already a bf16 value: never moves
        assert (got.float() == v).all()
        return
    frac = (v - lo) / (hi - lo)
    assert 0 < frac < 1
    assert abs(up.float().mean().item() - frac) < 6 * math.sqrt(frac * (1 - frac) / n)
    mean = got.double().mean().item()
    assert abs(mean - v) < 6 * spacing * math.sqrt(frac * (1 - frac) / n)
    # round-to-nearest is off by the whole distance to the closer neighbour, far outside that bound
    assert abs(torch.tensor(value).to(torch.bfloat16).item() - v) > 6 * spacing * math.sqrt(frac * (1 - frac) / n)


def _sgd_quarter_ulp(write_for, steps=1000, n=4096):
    """SGD moving 1.0 up by a quarter of its bf16 spacing (2**-7) per step; returns the total move."""
    p = torch.ones(n, dtype=torch.bfloat16)
    g = torch.full((n,), -1.0)
    opt = SGD(lr=2 ** -9)
    for step in range(steps):
        opt.update(p, rows_of(g), {}, step + 1, write=write_for(step))
    return p.float().mean().item() - 1.0


def test_sgd_below_half_an_ulp_moves_bf16_weights_only_when_rounding_stochastically():
    expected = 1000 * 2 ** -9  # ~1.95: crosses 2.0, where the spacing doubles; still unbiased
    moved = _sgd_quarter_ulp(lambda step: stochastic(generator_for(7, step, "layers.0", "wq", "cpu")))
    assert moved == pytest.approx(expected, rel=0.05)
    assert _sgd_quarter_ulp(lambda step: None) == 0.0  # nearest: every update lost
    assert _sgd_quarter_ulp(lambda step: nearest) == 0.0


def test_same_key_same_noise_other_step_other_noise():
    x = torch.linspace(-4, 4, 4097) + 2 ** -10  # mostly between bf16 neighbours
    a = stochastic_round(x, generator_for(3, 5, "layers.1", "w1", "cpu"))
    b = stochastic_round(x, generator_for(3, 5, "layers.1", "w1", "cpu"))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for other in (generator_for(3, 6, "layers.1", "w1", "cpu"), generator_for(4, 5, "layers.1", "w1", "cpu"),
                  generator_for(3, 5, "layers.2", "w1", "cpu"), generator_for(3, 5, "layers.1", "w2", "cpu")):
        assert not torch.equal(a, stochastic_round(x, other))


def test_inf_and_nan_pass_through():
    # a nan whose payload lies only in the dropped 16 bits would truncate to inf without the check
    low_nan = torch.tensor([0x7F800001, 0x7F80FFFF], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([float("inf"), float("-inf"), float("nan")]), low_nan, torch.tensor([1.5, -0.0, 0.0])])
    for step in range(20):
        got = stochastic_round(x, generator_for(0, step, "u", "t", "cpu")).float()
        assert got[0] == float("inf") and got[1] == float("-inf") and got[2:5].isnan().all()
        assert got[5] == 1.5
        assert torch.equal(got[6:].view(torch.int32), x[6:].view(torch.int32))  # signed zeros kept


@pytest.mark.parametrize("opt", [SGD(lr=0.01, weight_decay=0.1), Adalite(lr=0.01), AdaLomo(0.01, weight_decay=0.1),
                                 AdamW(0.01), AdamW(0.01, state_dtype=torch.bfloat16)],
                         ids=["sgd", "adalite", "adalomo", "adamw", "adamw-bf16-state"])
@pytest.mark.parametrize("shape", [(48, 40), (300,)])
def test_fp32_storage_is_the_same_bit_for_bit_with_the_stochastic_writer(opt, shape, monkeypatch):
    monkeypatch.setattr("slowft.optim.CHUNK_BYTES", 4 * 40 * 7)  # several chunks
    torch.manual_seed(0)
    p0, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    out = []
    for stoch in (False, True):
        p, state = p0.clone(), opt.init_state(p0)
        for t, g in enumerate(grads, 1):
            write = stochastic(generator_for(1, t, "u", "t", "cpu")) if stoch else None
            opt.update(p, rows_of(g), state, t, write=write)
        out.append(p)
    assert not torch.equal(out[0], p0)
    assert torch.equal(out[0].view(torch.int32), out[1].view(torch.int32))


@pytest.mark.parametrize("shape", [(64, 48), (500,)])
def test_adalite_on_bf16_rounds_its_fp32_result_to_a_neighbour_with_fp32_state(shape, monkeypatch):
    monkeypatch.setattr("slowft.optim.CHUNK_BYTES", 4 * 48 * 10)  # several chunks
    torch.manual_seed(1)
    p0 = torch.randn(shape).to(torch.bfloat16)
    g = torch.randn(shape)
    opt = Adalite(lr=1e-3)

    ref, ref_state = p0.float(), opt.init_state(p0.float())  # the same update in fp32 storage
    opt.update(ref, rows_of(g), ref_state, 1)

    near, near_state = p0.clone(), opt.init_state(p0)
    opt.update(near, rows_of(g), near_state, 1)
    assert torch.equal(near, ref.to(torch.bfloat16))  # nearest: the fp32 result, rounded once

    st, st_state = p0.clone(), opt.init_state(p0)
    opt.update(st, rows_of(g), st_state, 1, write=stochastic(generator_for(0, 1, "u", "t", "cpu")))
    assert st.dtype == torch.bfloat16
    for k, v in st_state.items():
        assert v.dtype == torch.float32
        assert torch.equal(v, ref_state[k])  # the state never sees the rounding
    lo, hi = neighbours(ref)
    assert ((st.float() == lo) | (st.float() == hi)).all()  # within one bf16 spacing of fp32
    assert not torch.equal(st, near)
    assert not torch.equal(st, p0)
