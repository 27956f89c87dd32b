"""The learning-rate schedules, how the optimizers store into a parameter, and AdamW's and AdaLomo's
arithmetic on one tensor: against torch.optim.AdamW and AdaLomo's formula written out densely
(``adalomo_step``, which test_optimizers_e2e checks the whole model against too). Adalite's and
SGD's arithmetic is checked against autograd in test_backprop."""
import math

import pytest
import torch

from slowft.errors import SlowftError
from slowft.optim import (OPTIMIZERS, SGD, AdaLomo, Adalite, AdamW, constant_lr, cosine_with_warmup, make_optimizer, row_chunks,
                          rows_of, state_bytes)
from slowft.rounding import generator_for, stochastic


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


@pytest.mark.parametrize("opt", [SGD(0.01, 0.1), Adalite(0.01), AdaLomo(0.01, weight_decay=0.1), AdamW(0.01)],
                         ids=lambda o: o.name)
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


# ----------------------------------------------------------------------------- AdamW

def several_chunks(monkeypatch, row_elems: int, rows: int = 3):
    monkeypatch.setattr("slowft.optim.CHUNK_BYTES", 4 * row_elems * rows)


@pytest.mark.parametrize("weight_decay", [0.01, 0.0])
@pytest.mark.parametrize("shape", [(40, 33), (70,)])
def test_adamw_three_steps_equal_torch(shape, weight_decay, monkeypatch):
    """Matrix and vector, a few rows (or elements) a chunk, an lr that changes between steps (a schedule)."""
    several_chunks(monkeypatch, shape[1] if len(shape) == 2 else 8)
    torch.manual_seed(0)
    p0, grads = torch.randn(shape), [torch.randn(shape) * s for s in (1.0, 0.01, 3.0)]
    ref = p0.clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, foreach=False)
    p, opt = p0.clone(), AdamW(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    state = opt.init_state(p)
    for t, (g, lr) in enumerate(zip(grads, (1e-2, 3e-2, 5e-3)), 1):
        torch_opt.param_groups[0]["lr"] = opt.lr = lr
        ref.grad = g.clone()
        torch_opt.step()
        opt.update(p, rows_of(g), state, t)
        torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=0)  # (in fact bit for bit on the CPU)
    want = torch_opt.state[ref]
    for k in ("exp_avg", "exp_avg_sq"):
        assert state[k].dtype == torch.float32
        torch.testing.assert_close(state[k], want[k], rtol=1e-5, atol=0)
    moved = (p - p0).abs().max().item()
    assert moved > 0.02  # ~ the sum of the lrs: each step moves every weight by about lr


def test_adamw_default_settings_are_torchs(monkeypatch):
    several_chunks(monkeypatch, 16)
    torch.manual_seed(2)
    p0, grads = torch.randn(20, 16), [torch.randn(20, 16) for _ in range(3)]
    ref = p0.clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, foreach=False)  # betas, eps, weight_decay: torch's defaults
    p, opt = p0.clone(), make_optimizer("adamw", 1e-3)
    state = opt.init_state(p)
    for t, g in enumerate(grads, 1):
        ref.grad = g.clone()
        torch_opt.step()
        opt.update(p, rows_of(g), state, t)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-5, atol=0)
    assert opt.settings() == {"optimizer": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                              "state_dtype": "float32"}


@pytest.mark.parametrize("shape", [(64, 48), (500,)])
def test_adamw_bf16_state_is_stored_stochastically_per_chunk_and_tracks_fp32_state(shape, monkeypatch):
    several_chunks(monkeypatch, 48, rows=10)  # 10 rows of the matrix, 480 elements of the vector
    torch.manual_seed(1)
    p0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(5)]
    lr = 1e-2
    fp32_opt, bf16_opt = AdamW(lr), AdamW(lr, state_dtype=torch.bfloat16)
    ref, ref_state = p0.clone(), fp32_opt.init_state(p0)
    p, state = p0.clone(), bf16_opt.init_state(p0)
    assert {k: v.dtype for k, v in state.items()} == {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    chunks = row_chunks(p)
    assert len(chunks) > 1
    largest = {k: torch.zeros(shape) for k in ref_state}  # each element's largest magnitude so far
    for t, g in enumerate(grads, 1):
        calls: list = []

        def state_write(key, t=t, calls=calls):
            inner = stochastic(generator_for(0, t, "u", f"w.{key}", "cpu"))

            def write(s, a, b, new):
                assert s is state[key] and new.dtype == torch.float32 and new.shape[0] == b - a
                calls.append((key, a, b))
                inner(s, a, b, new)

            return write

        fp32_opt.update(ref, rows_of(g), ref_state, t)
        bf16_opt.update(p, rows_of(g), state, t, state_write=state_write)
        # each chunk of each state tensor stored through its key's writer, in order, once
        assert sorted(calls) == sorted([(k, a, b) for k in state for a, b in chunks])
        for key in state:
            assert [(a, b) for k, a, b in calls if k == key] == chunks
        for k in state:
            assert state[k].dtype == torch.bfloat16
            # each step rounds to a neighbour (at most a bf16 spacing, 2**-7 relative, off) and
            # earlier errors decay: t spacings of the element's largest value so far bound the drift
            largest[k] = torch.maximum(largest[k], ref_state[k].abs())
            assert ((state[k].float() - ref_state[k]).abs() <= t * 2 ** -7 * largest[k]).all()
        if t == 1:  # the weights' first update uses the state before its rounding: fp32's exactly
            assert torch.equal(p, ref)
    assert p.dtype == torch.float32
    assert not torch.equal(p, ref)  # the rounded state does change the result...
    # ...by little: each step's update (about lr a weight) is off by the state's relative rounding
    # (~2**-8 each for m and v): the weights drift apart by less than steps * lr * 2**-6
    assert (p - ref).abs().max() < 5 * lr * 2 ** -6
    assert (p - p0).abs().max() > 4 * lr


def test_adamw_bf16_state_rounds_to_nearest_without_a_state_writer():
    torch.manual_seed(3)
    p0, g = torch.randn(16, 8), torch.randn(16, 8) * 1e-3
    opt = AdamW(1e-2, state_dtype="bfloat16")
    p, state = p0.clone(), opt.init_state(p0)
    opt.update(p, rows_of(g), state, 1)
    assert torch.equal(state["exp_avg"], (0.1 * g).to(torch.bfloat16))  # lerp from 0 by 1 - beta1, rounded once
    assert torch.equal(state["exp_avg_sq"], (0.001 * g * g).to(torch.bfloat16))
    torch.testing.assert_close(p, p0 * (1 - 1e-4) - 1e-2 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-7)  # step 1: ~lr*sign(g)


# ----------------------------------------------------------------------------- AdaLomo

def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean().sqrt()


@torch.no_grad()
def adalomo_step(params: dict[str, torch.Tensor], state: dict, t: int, lr: float, eps=(1e-30, 1e-3),
                 clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, grads: dict | None = None) -> None:
    """AdaLomo's update (Adafactor's factored second moment, update clip and relative step size) on
    every parameter, from its whole gradient (``grads``, else ``.grad``), dense and unfused, as the
    paper's reference code computes it. ``state[name]``: (row, column) moments, or the vector's."""
    for name, p in params.items():
        g = (grads[name] if grads is not None else p.grad).float()
        beta = 1.0 - t ** decay_rate
        u = g * g + eps[0]
        if p.dim() == 2:
            row, col = state.get(name, (torch.zeros(p.shape[0]), torch.zeros(p.shape[1])))
            row = beta * row + (1 - beta) * u.mean(dim=-1)
            col = beta * col + (1 - beta) * u.mean(dim=-2)
            state[name] = (row, col)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor) * g
        else:
            v = beta * state.get(name, torch.zeros_like(p)) + (1 - beta) * u
            state[name] = v
            update = v.rsqrt() * g
        update = update / (_rms(update) / clip_threshold).clamp(min=1.0)
        step = lr * max(eps[1], _rms(p.float()).item())
        if weight_decay:
            p.mul_(1 - step * weight_decay)
        p.add_(update, alpha=-step)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("clip", ["clipping", "not-clipping"])
@pytest.mark.parametrize("shape", [(40, 33), (70,)])
def test_adalomo_three_steps_equal_the_formula(shape, clip, weight_decay, monkeypatch):
    """Several chunks. Gradients growing 30x a step make the normalised update's RMS above 1 at
    steps 2 and 3 (the second moment lags behind): with clip_threshold 1 the clip divides every
    element, with 100 it is inactive."""
    several_chunks(monkeypatch, shape[1] if len(shape) == 2 else 8)
    torch.manual_seed(0)
    p0 = torch.randn(shape) * 0.05
    grads = [torch.randn(shape) * s for s in (1.0, 30.0, 1000.0)]
    clip_threshold = 1.0 if clip == "clipping" else 100.0
    lr = 1e-2
    opt = AdaLomo(lr, clip_threshold=clip_threshold, weight_decay=weight_decay)
    p, state, ref, ref_state = p0.clone(), opt.init_state(p0), p0.clone(), {}
    for t, g in enumerate(grads, 1):
        before = ref.clone()
        adalomo_step({"w": ref}, ref_state, t, lr, clip_threshold=clip_threshold, weight_decay=weight_decay,
                     grads={"w": g})
        opt.update(p, rows_of(g), state, t)
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-7)
        # the RMS of the update that was applied: clipped to exactly 1, or above 1 unclipped
        step_size = lr * max(1e-3, _rms(before).item())
        applied = _rms((before * (1 - step_size * weight_decay) - ref) / step_size).item()
        if clip == "clipping":
            assert applied == pytest.approx(1.0, rel=1e-3)
        elif t > 1:
            assert 1.1 < applied < clip_threshold
    if len(shape) == 2:
        torch.testing.assert_close(state["r"], ref_state["w"][0], rtol=1e-5, atol=0)
        torch.testing.assert_close(state["c"], ref_state["w"][1], rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(state["v"], ref_state["w"], rtol=1e-5, atol=0)
    assert (p - p0).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(24, 16), (50,)])
def test_adalomo_eps_and_decay_rate_are_the_formulas(shape, monkeypatch):
    """eps[0] large enough to matter (the default 1e-30 never does at fp32), inside the second
    moment; another decay_rate; p's RMS below eps[1], so the step size is lr * eps[1]."""
    several_chunks(monkeypatch, 16 if len(shape) == 2 else 8)
    torch.manual_seed(4)
    p0 = torch.randn(shape) * 1e-4
    kw = dict(eps=(1e-2, 1e-3), decay_rate=-0.5, clip_threshold=2.0)
    opt = AdaLomo(0.1, **kw)
    p, state, ref, ref_state = p0.clone(), opt.init_state(p0), p0.clone(), {}
    for t in range(1, 4):
        g = torch.randn(shape) * 0.1
        adalomo_step({"w": ref}, ref_state, t, 0.1, grads={"w": g}, **kw)
        opt.update(p, rows_of(g), state, t)
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-9)
    assert (p - p0).abs().max() > 1e-5


def test_adalomo_step_size_follows_the_weights_rms_with_a_floor(monkeypatch):
    """lr * max(eps[1], rms(p)): a zero matrix moves by lr * eps[1] (times the clipped update)."""
    several_chunks(monkeypatch, 8)
    g = torch.randn(12, 8)
    for scale, want in ((0.0, 1e-3), (2.0, None)):
        p = torch.full((12, 8), scale)
        opt = AdaLomo(0.1)
        ref = p.clone()
        adalomo_step({"w": ref}, {}, 1, 0.1, grads={"w": g})
        opt.update(p, rows_of(g), opt.init_state(p), 1)
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-9)
        step = 0.1 * (want if want is not None else scale)
        assert ((p - scale) / step).square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_adalomo_passes_twice_and_takes_each_slice_in_order():
    opt = AdaLomo(1e-3)
    assert opt.passes == 2 and AdamW(1e-3).passes == 1
    g, asked = torch.randn(10, 4), []

    def rows(a, b):
        asked.append((a, b))
        return g[a:b]

    p = torch.randn(10, 4)
    opt.update(p, rows, opt.init_state(p), 1)
    assert asked == [(0, 10), (0, 10)]


# ----------------------------------------------------------------------------- settings and errors

def test_make_optimizer_and_what_each_state_costs():
    assert set(OPTIMIZERS) == {"sgd", "adalite", "adalomo", "adamw"}
    assert isinstance(make_optimizer("sgd", 0.1, 0.0), SGD)  # finetune.py's call
    assert isinstance(make_optimizer("adalite", 1e-5, 0.0), Adalite)
    lomo = make_optimizer("adalomo", 1e-3, weight_decay=0.1, eps=(1e-30, 1e-2))
    assert isinstance(lomo, AdaLomo) and lomo.weight_decay == 0.1 and lomo.eps == (1e-30, 1e-2)
    adamw = make_optimizer("adamw", 1e-4, None, betas=(0.9, 0.95), eps=1e-6, state_dtype="bfloat16")
    assert adamw.settings() == {"optimizer": "adamw", "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.01,
                                "state_dtype": "bfloat16"}
    assert make_optimizer("adamw", 1e-4, 0.0).weight_decay == 0.0
    assert state_bytes("sgd", (100, 30)) == 0
    assert state_bytes("adalite", (100, 30)) == 4 * 30
    assert state_bytes("adalomo", (100, 30)) == 4 * (100 + 30)
    assert state_bytes("adalomo", (30,)) == state_bytes("adalite", (30,)) == 4 * 30
    assert state_bytes("adamw", (100, 30)) == 2 * 4 * 3000
    assert state_bytes(adamw, (100, 30)) == 2 * 2 * 3000
    for opt in (SGD(0.1), Adalite(0.1), lomo, adamw):  # what init_state makes
        assert state_bytes(opt, (7, 5)) == sum(t.numel() * t.element_size() for t in opt.init_state(torch.empty(7, 5)).values())


@pytest.mark.parametrize("make, message", [
    (lambda: AdamW(1e-3, betas=(1.0, 0.999)), "AdamW betas (1.0, 0.999): expected each in [0, 1)"),
    (lambda: AdamW(1e-3, betas=(0.9, -0.1)), "AdamW betas (0.9, -0.1): expected each in [0, 1)"),
    (lambda: AdamW(1e-3, betas=0.9), "AdamW betas 0.9: expected two numbers, each in [0, 1)"),
    (lambda: AdamW(-1e-3), "AdamW lr -0.001: expected a number >= 0"),
    (lambda: AdamW(float("nan")), "AdamW lr nan: expected a number >= 0"),
    (lambda: AdamW(1e-3, eps=-1.0), "AdamW eps -1.0: expected a number >= 0"),
    (lambda: AdamW(1e-3, weight_decay=-0.1), "AdamW weight_decay -0.1: expected a number >= 0"),
    (lambda: AdamW(1e-3, state_dtype=torch.float16), "AdamW state_dtype torch.float16: expected torch.float32 or torch.bfloat16"),
    (lambda: AdamW(1e-3, state_dtype="fp8"), "AdamW state_dtype 'fp8': expected torch.float32 or torch.bfloat16"),
    (lambda: AdaLomo(-1.0), "AdaLomo lr -1.0: expected a number >= 0"),
    (lambda: AdaLomo(1e-3, eps=(0.0, 1e-3)), "AdaLomo eps (0.0, 0.001): expected (a number > 0, a number >= 0)"),
    (lambda: AdaLomo(1e-3, clip_threshold=0), "AdaLomo clip_threshold 0: expected a number > 0"),
    (lambda: AdaLomo(1e-3, decay_rate=0.8), "AdaLomo decay_rate 0.8: expected a number in [-1, 0]"),
    (lambda: AdaLomo(1e-3, weight_decay=-1), "AdaLomo weight_decay -1: expected a number >= 0"),
    (lambda: SGD(-0.1), "SGD lr -0.1: expected a number >= 0"),
    (lambda: Adalite("1e-3"), "Adalite lr '1e-3': expected a number >= 0"),
    (lambda: make_optimizer("adam", 1e-3), "optimizer 'adam': expected one of"),
    (lambda: make_optimizer("sgd", 1e-3, betas=(0.9, 0.99)), "optimizer 'sgd' has no setting betas"),
    (lambda: make_optimizer("adalite", 1e-3, 0.1), "optimizer 'adalite' has no setting weight_decay"),
    (lambda: make_optimizer("adalomo", 1e-3, state_dtype="bfloat16"), "optimizer 'adalomo' has no setting state_dtype"),
])
def test_bad_settings_are_named_in_the_python_apis_terms(make, message):
    with pytest.raises(SlowftError) as e:
        make()
    assert str(e.value).startswith(message)
