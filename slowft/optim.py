"""Fused optimizers: each updates one tensor in place as soon as its gradient exists (LOMO).

An optimizer here never sees the whole model, only (parameter, gradient, its state, step). Its
state is a dict of small tensors that the store keeps inside the parameter's unit file.
"""
from __future__ import annotations

import math

import torch


class SGD:
    """Stateless SGD as in LOMO: ``p -= lr * (g + weight_decay * p)`` (torch.optim.SGD's arithmetic)."""

    name = "sgd"

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr, self.weight_decay = lr, weight_decay

    def settings(self) -> dict:
        return {"optimizer": self.name, "weight_decay": self.weight_decay}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict, t: int) -> None:
        g = g.to(p.dtype)
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        p.add_(g, alpha=-self.lr)


class Adalite:
    """SlimTrainer's Adalite: Adafactor-style factored second moment plus a LAMB-like trust ratio.

    State: one value per column for a matrix (``c``), a full vector for a 1-D tensor (``v``).
    """

    name = "adalite"

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
    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict, t: int) -> None:
        g = g.float()
        pf = p.float()
        if p.dim() == 2 and self.centralize:
            g = g - g.mean(dim=1, keepdim=True)
        beta = 1.0 - t ** (-self.beta_decay)
        u = g * g
        if p.dim() == 2:
            u = (1 - beta) * u + beta * state["c"][None, :]
            u += self.eps
            state["c"].copy_(u.mean(dim=0))
        else:
            u = (1 - beta) * u + beta * state["v"]
            u += self.eps
            state["v"].copy_(u)
        m = g / u.sqrt()
        if self.use_rms:
            m /= torch.clamp(m.square().mean().sqrt(), min=1.0)
        p_norm, g_norm = pf.norm(), g.norm()
        if p_norm != 0 and g_norm != 0:
            m *= p_norm / g_norm
            m += self.Lambda * (pf - pf / p_norm)
        p.copy_(pf - self.lr * m)


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0):
    if name == "sgd":
        return SGD(lr, weight_decay)
    if name == "adalite":
        return Adalite(lr)
    raise ValueError(f"unknown optimizer {name!r}")


def constant_lr(lr: float):
    return lambda step: lr


def cosine_with_warmup(lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
    """SlimTrainer's CosineDecayWithWarmup, decaying to ``min_lr``; ``step`` counts from 0."""

    def at(step: int) -> float:
        t = step + 1
        if t < warmup_steps:
            return lr * t / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (t - warmup_steps) / span)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2

    return at
