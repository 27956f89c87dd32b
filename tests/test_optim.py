"""The learning-rate schedules (the optimizers' arithmetic is checked against autograd in test_backprop)."""
import math

import pytest

from slowft.optim import constant_lr, cosine_with_warmup


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
