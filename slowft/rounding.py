"""Stochastic rounding to bfloat16, so that bf16 weights do not lose small updates.

bf16 keeps 8 bits of mantissa: near 1.0 its spacing is 2**-7, so an update under half of that
rounds back to the old weight under round-to-nearest, every step, and training stalls. Rounding
up with probability (distance to the lower neighbour) / spacing makes the stored weight right on
average (E[result] == value), so many small updates add up as they would in fp32.

The noise comes from a generator seeded by (seed, step, unit, tensor), as dropout's masks are:
a step redone after a crash rounds exactly as it did the first time.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

# write(p, a, b, new): store the fp32 ``new`` into p[a:b], rounding it to p's dtype
Write = Callable[[torch.Tensor, int, int, torch.Tensor], None]


def stochastic_round(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``value`` (fp32) rounded to bfloat16 up or down at random, unbiased; inf and nan unchanged.

    Adding uniform noise below the 16 bits bf16 drops, then dropping them, carries into the kept
    bits with probability equal to the dropped fraction. fp32 is sign-magnitude, so this works on
    the magnitude alike for negatives. Only int32 add and bitwise-and: any backend has them.
    """
    value = value.to(torch.float32)
    noise = torch.randint(0, 1 << 16, value.shape, generator=generator, device=generator.device,
                          dtype=torch.int32).to(value.device)  # drawn where the generator lives
    bits = (value.view(torch.int32) + noise) & -65536
    rounded = torch.where(torch.isfinite(value), bits.view(torch.float32), value)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def generator_for(seed: int, step: int, unit: str, tensor: str, device) -> torch.Generator:
    """A generator for one tensor's update at one step: the same key always draws the same noise."""
    text = f"{seed}/{step}/{unit}/{tensor}".encode()
    key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
    try:
        gen = torch.Generator(device=torch.device(device))
    except RuntimeError:  # a backend without device generators: draw on the cpu
        gen = torch.Generator()
    gen.manual_seed(key)
    return gen


def nearest(p: torch.Tensor, a: int, b: int, new: torch.Tensor) -> None:
    """Round-to-nearest (copy_'s rounding): exact for fp32 storage."""
    p[a:b].copy_(new)


def stochastic(generator: torch.Generator) -> Write:
    """A writer rounding stochastically into bf16 storage; other dtypes (fp32: exact) as ``nearest``.

    Each call draws the next noise from ``generator``, so chunks written in order round the same
    way every time.
    """
    def write(p: torch.Tensor, a: int, b: int, new: torch.Tensor) -> None:
        if p.dtype == torch.bfloat16:
            p[a:b].copy_(stochastic_round(new, generator))
        else:
            nearest(p, a, b, new)

    return write
