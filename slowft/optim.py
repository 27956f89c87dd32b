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
is updated with the same arithmetic, bit for bit, whichever the writer. Optimizer state kept in
bf16 (AdamW's ``state_dtype``) is stored the same way, through ``state_write(key)``'s writer.

The optimizers: SGD (no state), Adalite and AdaLomo (factored second moments: a vector or two
per matrix, two passes), AdamW (two tensors like each weight, one pass). ``OPTIMIZERS`` names
them, ``OPTIMIZER_COSTS`` says what each costs in RAM and SSD traffic, ``state_bytes`` counts it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import SlowftError
from .rounding import Write, nearest

# (a, b) -> the gradient of p[a:b]; its next call may reuse the tensor, so an update is done
# with one slice before it asks for the next
Rows = Callable[[int, int], torch.Tensor]

# key of a state tensor -> the writer that stores it (None: round to nearest). Only state kept in
# a narrower dtype than fp32 is stored through it; fp32 state is updated in place.
StateWrite = Callable[[str], "Write | None"]

# An update works on about this many bytes of a parameter at a time: 13b's tensors are 100-650 MB
# in fp32, so its temporaries stay small, in pieces few enough that GPU kernel launches (~40 per
# piece for Adalite) cost little.
CHUNK_BYTES = 16 << 20


def rows_of(g: torch.Tensor) -> Rows:
    return lambda a, b: g[a:b]


def row_chunks(p: torch.Tensor) -> list[tuple[int, int]]:
    n = max(1, CHUNK_BYTES // (4 * max(1, p[0].numel())))
    return [(a, min(a + n, p.shape[0])) for a in range(0, p.shape[0], n)]


def _bad(cls: str, arg: str, value, expected: str) -> SlowftError:
    return SlowftError(f"{cls} {arg} {value!r}: expected {expected}")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_range(cls: str, arg: str, value, expected: str, lo: float = -math.inf, hi: float = math.inf,
                 lo_open: bool = False, hi_open: bool = True) -> float:
    """``value`` as a float when it lies between lo and hi (each end open or closed), else a SlowftError."""
    x = _number(value)
    if x is None or not ((lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)):
        raise _bad(cls, arg, value, expected)
    return x


def _check_lr(cls: str, lr) -> float:
    return _check_range(cls, "lr", lr, "a number >= 0", lo=0.0)


def _check_pair(cls: str, arg: str, value, expected: str, ok) -> tuple[float, float]:
    try:
        pair = tuple(value)
    except TypeError:
        raise _bad(cls, arg, value, f"two numbers, {expected}") from None
    nums = tuple(_number(v) for v in pair)
    if len(nums) != 2 or None in nums or not all(ok(v) for v in nums):
        raise _bad(cls, arg, pair if len(pair) == 2 else value, expected)
    return nums


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _state_dtype(cls: str, value) -> torch.dtype:
    for name, dtype in STATE_DTYPES.items():
        if value == dtype or value == name:
            return dtype
    raise _bad(cls, "state_dtype", value, "torch.float32 or torch.bfloat16")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in STATE_DTYPES.items() if d == dtype)


class SGD:
    """Stateless SGD as in LOMO: ``p -= lr * (g + weight_decay * p)`` (torch.optim.SGD's arithmetic)."""

    name = "sgd"
    passes = 1  # times update() asks for each slice of the gradient

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr = _check_lr("SGD", lr)
        self.weight_decay = _check_range("SGD", "weight_decay", weight_decay, "a number >= 0", lo=0.0)

    def settings(self) -> dict:
        return {"optimizer": self.name, "weight_decay": self.weight_decay}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None,
               state_write: StateWrite | None = None) -> None:
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

    ``trust``: the trust ratio. "update" (the default, as LAMB has it): |p| / |normalised update|,
    so each step moves a tensor by ``lr`` of its norm, whatever the gradient's scale. "gradient":
    the published formula, |p| / |g|; as the normalised update does not shrink with the gradient
    (it is g / sqrt(its second moment), ~1 an element, or g / sqrt(eps) for tiny g), a step then
    moves a tensor by up to lr / sqrt(eps) = 316 x lr of its norm: at lr 3e-3 a median 17 % a step
    and up to 95 % (measured on a dim-96 model), which is why the formula diverged or collapsed to
    a uniform output on small fine-tunes. Kept for parity with the published Adalite.
    """

    name = "adalite"
    passes = 2

    def __init__(self, lr: float, eps: float = 1e-5, Lambda: float = 0.01, beta_decay: float = 0.8,
                 centralize: bool = True, use_rms: bool = True, trust: str = "update"):
        _check_lr("Adalite", lr)
        if trust not in ("update", "gradient"):
            raise _bad("Adalite", "trust", trust, '"update" or "gradient"')
        self.lr, self.eps, self.Lambda, self.beta_decay = lr, eps, Lambda, beta_decay
        self.centralize, self.use_rms, self.trust = centralize, use_rms, trust

    def settings(self) -> dict:
        return {"optimizer": self.name, "eps": self.eps, "Lambda": self.Lambda, "beta_decay": self.beta_decay,
                "centralize": self.centralize, "use_rms": self.use_rms, "trust": self.trust}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.dim() == 2:
            return {"c": torch.zeros(p.shape[1], device=p.device, dtype=torch.float32)}
        return {"v": torch.zeros(p.shape, device=p.device, dtype=torch.float32)}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None,
               state_write: StateWrite | None = None) -> None:
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
        p_norm = p2.sqrt()
        by = g2.sqrt() if self.trust == "gradient" else m2.sqrt() / clip  # the norm the ratio divides by
        trust = (p_norm != 0) & (by != 0)  # no host sync: the GPU runs on
        ratio = torch.where(trust, p_norm / by, 1.0)
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


class AdaLomo:
    """AdaLomo (Lv et al. 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"):
    Adafactor's factored second moment, its update RMS clip and parameter-scaled step size, fused.

    For step t and gradient g: ``beta = 1 - t ** decay_rate``, ``u = g*g + eps[0]``; a matrix
    keeps one value per row (``r``) and one per column (``c``): ``r = beta*r + (1-beta)*mean_j u``,
    ``c = beta*c + (1-beta)*mean_i u``, ``upd = g * rsqrt(r / mean(r))[:, None] * rsqrt(c)[None, :]``;
    a vector keeps ``v`` like itself: ``v = beta*v + (1-beta)*u``, ``upd = g * rsqrt(v)``. Then
    ``upd /= max(1, rms(upd) / clip_threshold)``, ``lr_t = lr * max(eps[1], rms(p))``,
    ``p *= 1 - lr_t*weight_decay``, ``p -= lr_t*upd``.

    Two passes over the rows, no more: the first takes each slice once and stores each row's new
    ``r`` (it needs only that row), sums the columns of ``u`` (for ``c``), ``|p|^2``, and, per
    column, ``sum_i g_ij^2 / r_i``. Since ``upd_ij^2 = g_ij^2 * mean(r) / (r_i c_j)``, the update's
    whole sum of squares is then ``mean(r) * sum_j (that column sum) / c_j``: the clip is known
    before any row is updated, without a pass of its own. The second pass applies the update.
    (A vector's ``v`` is per element: the first pass stores it and sums ``g^2 / v``.)
    """

    name = "adalomo"
    passes = 2

    def __init__(self, lr: float, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):
        self.lr = _check_lr("AdaLomo", lr)
        self.eps = _check_pair("AdaLomo", "eps", eps, "(a number > 0, a number >= 0)", lambda v: 0 <= v < math.inf)
        if not self.eps[0] > 0:
            raise _bad("AdaLomo", "eps", eps, "(a number > 0, a number >= 0)")
        self.clip_threshold = _check_range("AdaLomo", "clip_threshold", clip_threshold, "a number > 0", lo=0.0, lo_open=True)
        self.decay_rate = _check_range("AdaLomo", "decay_rate", decay_rate, "a number in [-1, 0]", lo=-1.0, hi=0.0, hi_open=False)
        self.weight_decay = _check_range("AdaLomo", "weight_decay", weight_decay, "a number >= 0", lo=0.0)

    def settings(self) -> dict:
        return {"optimizer": self.name, "eps": list(self.eps), "clip_threshold": self.clip_threshold,
                "decay_rate": self.decay_rate, "weight_decay": self.weight_decay}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.dim() == 2:
            return {"r": torch.zeros(p.shape[0], device=p.device, dtype=torch.float32),
                    "c": torch.zeros(p.shape[1], device=p.device, dtype=torch.float32)}
        return {"v": torch.zeros(p.shape, device=p.device, dtype=torch.float32)}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None,
               state_write: StateWrite | None = None) -> None:
        write = write or nearest
        matrix = p.dim() == 2
        beta = 1.0 - t ** self.decay_rate
        eps0, eps1 = self.eps
        chunks = row_chunks(p)
        zero = torch.zeros((), device=p.device)
        p2 = zero.clone()
        # first pass: the new second moments, and the sums the clip and the step size need
        if matrix:
            r, c = state["r"], state["c"]
            u_cols = torch.zeros_like(c)  # sum over rows of u, per column
            q_cols = torch.zeros_like(c)  # sum over rows of g^2 / r (new r), per column
            for a, b in chunks:
                g = rows(a, b).float()
                g2 = g * g
                u = g2 + eps0
                r[a:b] = beta * r[a:b] + (1 - beta) * u.mean(dim=1)
                u_cols += u.sum(dim=0)
                del u
                q_cols += (g2 / r[a:b, None]).sum(dim=0)
                p2 += p[a:b].float().square().sum()
            c.copy_(beta * c + (1 - beta) * (u_cols / p.shape[0]))
            r_mean = r.mean()
            upd2 = r_mean * (q_cols / c).sum()
            col = c.rsqrt()
        else:
            v = state["v"]
            upd2 = zero.clone()
            for a, b in chunks:
                g = rows(a, b).float()
                g2 = g * g
                v[a:b] = beta * v[a:b] + (1 - beta) * (g2 + eps0)
                upd2 += (g2 / v[a:b]).sum()
                p2 += p[a:b].float().square().sum()
        n = p.numel()
        clip = torch.clamp((upd2 / n).sqrt() / self.clip_threshold, min=1.0)  # no host sync
        lr_t = self.lr * torch.clamp((p2 / n).sqrt(), min=eps1)
        decay = 1 - lr_t * self.weight_decay if self.weight_decay else None
        for a, b in chunks:  # second pass: the update
            g = rows(a, b).float()
            if matrix:
                upd = g * (r[a:b] / r_mean).rsqrt()[:, None] * col[None, :]
            else:
                upd = g * v[a:b].rsqrt()
            upd /= clip
            pf = p[a:b].float()
            if decay is not None:
                pf = pf * decay
            write(p, a, b, pf - lr_t * upd)


class AdamW:
    """torch.optim.AdamW, fused: the same arithmetic in the same order as torch's single-tensor
    implementation (decoupled weight decay ``p *= 1 - lr*weight_decay``, then the moments, then
    ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``), a chunk of rows at a time.

    State: ``exp_avg`` and ``exp_avg_sq`` shaped like the weight, in ``state_dtype``: float32
    (updated in place, as torch does), or bfloat16, half the bytes on SSD: each chunk of state is
    then computed in fp32, used unrounded for the weight's update, and stored through
    ``state_write(key)``'s writer (stochastic rounding keeps small moment updates on average).
    Every step reads and writes two tensors as large as the weight (in fp32, 3x the weight's bytes).
    """

    name = "adamw"
    passes = 1

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: torch.dtype = torch.float32):
        self.lr = _check_lr("AdamW", lr)
        self.betas = _check_pair("AdamW", "betas", betas, "each in [0, 1)", lambda v: 0 <= v < 1)
        self.eps = _check_range("AdamW", "eps", eps, "a number >= 0", lo=0.0)
        self.weight_decay = _check_range("AdamW", "weight_decay", weight_decay, "a number >= 0", lo=0.0)
        self.state_dtype = _state_dtype("AdamW", state_dtype)

    def settings(self) -> dict:
        return {"optimizer": self.name, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "state_dtype": _dtype_name(self.state_dtype)}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(p.shape, device=p.device, dtype=self.state_dtype) for k in ("exp_avg", "exp_avg_sq")}

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: Rows, state: dict, t: int, *, write: Write | None = None,
               state_write: StateWrite | None = None) -> None:
        write = write or nearest
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = self.betas
        lr, wd = self.lr, self.weight_decay
        # torch's scalars, in Python floats as torch computes them
        step_size = lr / (1 - beta1 ** t)
        bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
        in_place = p.dtype == torch.float32 and write is nearest
        narrow = {k: s.dtype != torch.float32 for k, s in state.items()}
        writers = {k: ((state_write(k) if state_write else None) or nearest) for k, x in narrow.items() if x}
        for a, b in row_chunks(p):
            g = rows(a, b).float()
            pf = p[a:b] if in_place else p[a:b].to(torch.float32, copy=True)
            if wd != 0:
                pf.mul_(1 - lr * wd)
            m = exp_avg[a:b].float() if narrow["exp_avg"] else exp_avg[a:b]
            v = exp_avg_sq[a:b].float() if narrow["exp_avg_sq"] else exp_avg_sq[a:b]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            pf.addcdiv_(m, denom, value=-step_size)
            del denom
            for k, s, x in (("exp_avg", exp_avg, m), ("exp_avg_sq", exp_avg_sq, v)):
                if narrow[k]:
                    writers[k](s, a, b, x)
            if not in_place:
                write(p, a, b, pf)


# name -> what its state costs in RAM and on SSD (for finetune.py -h)
OPTIMIZER_COSTS = {
    "adalite": "one fp32 value per matrix column and a vector like each 1-D weight "
               "(state under 1/1000 of the weights at llama2 sizes)",
    "adalomo": "one fp32 value per matrix row and per column and a vector like each 1-D weight "
               "(state under 1/1000 of the weights at llama2 sizes)",
    "adamw": "two tensors like each weight, 8 bytes a parameter (4 with bf16 state): an fp32 run reads and "
             "writes 3x the weights' bytes a step (2x with bf16 state)",
    "sgd": "no state: each step reads and writes the weights only",
}
OPTIMIZERS = tuple(OPTIMIZER_COSTS)


def optimizers_help() -> str:
    """The optimizers and their costs, one line each."""
    return "\n".join(f"{name}: {cost}" for name, cost in OPTIMIZER_COSTS.items())


def make_optimizer(name: str, lr: float, weight_decay: float | None = None, betas: tuple[float, float] | None = None,
                   eps: float | None = None, state_dtype: torch.dtype | str | None = None):
    """The optimizer ``name`` (one of OPTIMIZERS); a setting left None takes the optimizer's default.
    A setting the optimizer does not have raises SlowftError (Adalite: weight_decay 0 is accepted)."""
    given = {k: v for k, v in (("weight_decay", weight_decay), ("betas", betas), ("eps", eps),
                               ("state_dtype", state_dtype)) if v is not None}
    takes = {"sgd": ("weight_decay",), "adalite": ("eps",), "adalomo": ("weight_decay", "eps"),
             "adamw": ("weight_decay", "betas", "eps", "state_dtype")}
    if name not in takes:
        raise SlowftError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adalite" and given.get("weight_decay") == 0:
        del given["weight_decay"]  # (the command line's default)
    for k in given:
        if k not in takes[name]:
            raise SlowftError(f"optimizer {name!r} has no setting {k} (given {given[k]!r}); its settings: "
                              f"{', '.join(takes[name])}")
    cls = {"sgd": SGD, "adalite": Adalite, "adalomo": AdaLomo, "adamw": AdamW}[name]
    return cls(lr, **given)


def state_bytes(optimizer, shape) -> int:
    """Bytes of optimizer state for a weight of ``shape``; ``optimizer`` an optimizer or its name
    (with its default settings)."""
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, 0.0)
    meta = torch.empty(tuple(shape), device="meta")
    return sum(s.numel() * s.element_size() for s in optimizer.init_state(meta).values())


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
