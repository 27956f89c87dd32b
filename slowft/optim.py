"""Fused optimizers: each updates one tensor in place as soon as its gradient exists (LOMO).

An optimizer here never sees the whole model, only (parameter, gradient, its state, step). Its
state is a dict of small tensors that the store keeps inside the parameter's unit file.

The gradient comes as a function of a range of rows, ``rows(a, b)`` -> the gradient of
``p[a:b]``, and an update works on a few MB of rows at a time. So neither the gradient of a
[vocab, dim] matrix (the head's, the embedding's) nor an update's temporaries ever need to exist
whole: the head and the embedding build each slice of theirs on demand, and Adalite, which needs
whole-tensor norms before it can update any row, asks for each slice twice.

Every store into a parameter goes through a ``write`` (slowft.rounding), a chunk of rows at a time
in order: round-to-nearest by default, or stochastic rounding, under which updates smaller than
half a bf16 spacing still move bf16 weights (on average) instead of being lost. An fp32 parameter
is updated with the same arithmetic, bit for bit, whichever the writer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .rounding import Write, nearest

# (a, b) -> the gradient of p[a:b]; its next call may reuse the tensor, so an update is done
# with one slice before it asks for the next
Rows = Callable[[int, int], torch.Tensor]

# An update works on about this many bytes of a parameter at a time: 13b's tensors are 100-650 MB
# in fp32, so its temporaries stay small, in pieces few enough that GPU kernel launches (~40 per
# piece for Adalite) cost little.
CHUNK_BYTES = 16 << 20


def rows_of(g: torch.Tensor) -> Rows:
    return lambda a, b: g[a:b]


def row_chunks(p: torch.Tensor) -> list[tuple[int, int]]:
    n = max(1, CHUNK_BYTES // (4 * max(1, p[0].numel())))
    return [(a, min(a + n, p.shape[0])) for a in range(0, p.shape[0], n)]


class SGD:
    """Stateless SGD as in LOMO: ``p -= lr * (g + weight_decay * p)`` (torch.optim.SGD's arithmetic)."""

    name = "sgd"
    passes = 1  # times update() asks for each slice of the gradient

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr, self.weight_decay = lr, weight_decay

    def settings(self) -> dict:
        return {"optimizer": self.name, "weight_decay": self.weight_decay}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None) -> None:
        write = write or nearest
        bf16 = p.dtype == torch.bfloat16
        for a, b in row_chunks(p):
            if bf16:  # the new value in fp32, rounded once, by the writer
                g = rows(a, b).float()
                if self.weight_decay:
                    g = g + self.weight_decay * p[a:b].float()
                write(p, a, b, p[a:b].float() - self.lr * g)
                continue
            g = rows(a, b).to(p.dtype)
            if self.weight_decay:
                g = g.add(p[a:b], alpha=self.weight_decay)
            if write is nearest:  # (in place: no temporary)
                p[a:b].add_(g, alpha=-self.lr)
            else:
                write(p, a, b, torch.add(p[a:b], g, alpha=-self.lr))  # add_'s arithmetic, out of place


class Adalite:
    """SlimTrainer's Adalite: Adafactor-style factored second moment plus a LAMB-like trust ratio.

    State: one value per column for a matrix (``c``), a full vector for a 1-D tensor (``v``).
    The RMS clip and the trust ratio need norms of the whole update, so a first pass over the
    rows sums them and a second applies the update; neither holds more than a chunk of rows.
    """

    name = "adalite"
    passes = 2

    def __init__(self, lr: float, eps: float = 1e-5, Lambda: float = 0.01, beta_decay: float = 0.8,
                 centralize: bool = True, use_rms: bool = True):
        self.lr, self.eps, self.Lambda, self.beta_decay = lr, eps, Lambda, beta_decay
        self.centralize, self.use_rms = centralize, use_rms

    def settings(self) -> dict:
        return {"optimizer": self.name, "eps": self.eps, "Lambda": self.Lambda, "beta_decay": self.beta_decay,
                "centralize": self.centralize, "use_rms": self.use_rms}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.dim() == 2:
            return {"c": torch.zeros(p.shape[1], device=p.device, dtype=torch.float32)}
        return {"v": torch.zeros(p.shape, device=p.device, dtype=torch.float32)}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None) -> None:
        write = write or nearest
        matrix = p.dim() == 2
        old = state["c"] if matrix else state["v"]
        beta = 1.0 - t ** (-self.beta_decay)

        def moments(a: int, b: int):
            """Centred gradient, second moment and normalised update of rows a..b."""
            g = rows(a, b).float()
            if matrix and self.centralize:
                g = g - g.mean(dim=1, keepdim=True)
            u = (1 - beta) * (g * g) + beta * (old[None, :] if matrix else old[a:b])
            u += self.eps
            return g, u, g / u.sqrt()

        chunks = row_chunks(p)
        zero = torch.zeros((), device=p.device)
        c_sum = torch.zeros_like(old) if matrix else None
        m2, g2, p2 = zero.clone(), zero.clone(), zero.clone()
        for a, b in chunks:  # first pass: the whole tensor's norms
            g, u, m = moments(a, b)
            if matrix:
                c_sum += u.sum(dim=0)
            m2 += m.square().sum()
            g2 += g.square().sum()
            p2 += p[a:b].float().square().sum()
        clip = torch.clamp((m2 / p.numel()).sqrt(), min=1.0) if self.use_rms else 1.0
        p_norm, g_norm = p2.sqrt(), g2.sqrt()
        trust = (p_norm != 0) & (g_norm != 0)  # no host sync: the GPU runs on
        ratio = torch.where(trust, p_norm / g_norm, 1.0)
        lam = torch.where(trust, self.Lambda, 0.0)
        p_div = torch.where(trust, p_norm, 1.0)
        for a, b in chunks:  # second pass: the update
            g, u, m = moments(a, b)
            if not matrix:
                old[a:b].copy_(u)
            pf = p[a:b].float()
            m = m / clip * ratio
            m += lam * (pf - pf / p_div)
            write(p, a, b, pf - self.lr * m)
        if matrix:
            old.copy_(c_sum / p.shape[0])


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return SGD(lr, weight_decay)
    if name == "adalite":
        return Adalite(lr)
    raise ValueError(f"unknown optimizer {name!r}")


def constant_lr(lr: float):
    return lambda step: lr


def cosine_with_warmup(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
    """Linear warmup to ``lr`` over ``warmup_steps`` (the last of them at ``lr``), then a cosine
    decay towards ``min_lr`` that its last step does not reach: no step is spent at lr 0 (a run
    of one step trains at ``lr``). ``step`` counts from 0."""
    top = max(0, warmup_steps - 1)  # the first step at full lr

    def at(step: int) -> float:
        if step < top:
            return lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - top) / max(1, total_steps - top))
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2

    return at
