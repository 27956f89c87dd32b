"""Meta's Llama 2 architecture, written so that one transformer block can run on its own.

Parameter names are Meta's (``attention.wq.weight`` ...), so a block's weights travel between
Meta's checkpoints, the block store and these modules without renaming. Offloaded code keeps one
weightless ``TransformerBlock`` and calls it with a block's tensors (``torch.func.functional_call``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# Meta's reference code for Llama 3.1+ (use_scaled_rope); a params.json may name another factor
# (rope_scaling_factor: 32 for Llama 3.2 1B/3B, as their Hugging Face configs say)
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: take it from the tokenizer / the embedding's shape
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # not in params.json: llama2 4096, CodeLlama (rope_theta 1e6) 16384
    rope_scaling: dict | None = None  # Llama 3.1's: factor, low/high_freq_factor, original_max_position_embeddings
    ffn_hidden: int | None = None  # the FFN's width where a config gives it (Hugging Face's intermediate_size)
    tie_embeddings: bool = False  # the output projection is the token embedding (Llama 3.2 1B/3B)

    @classmethod
    def from_params(cls, params: dict, vocab_size: int | None = None) -> "ModelArgs":
        """Builds args from a params.json dict; unknown keys (e.g. ``max_batch_size``) are ignored."""
        known = {f.name for f in fields(cls)} - {"rope_scaling", "ffn_hidden", "tie_embeddings"}
        args = cls(**{k: v for k, v in params.items() if k in known})
        if "max_seq_len" not in params and args.rope_theta >= 5e5:  # CodeLlama's 1e6, Llama 3's 5e5
            args.max_seq_len = 16384 if args.rope_theta >= 1e6 else 8192
        if params.get("use_scaled_rope"):  # Meta's Llama 3.1+: the scaling its reference code applies
            args.rope_scaling = {k: float(params.get(f"rope_scaling_{k}", v)) for k, v in LLAMA3_ROPE_SCALING.items()}
            args.max_seq_len = int(params.get("max_seq_len", 131072))
        if args.vocab_size <= 0 and vocab_size is not None:
            args.vocab_size = vocab_size
        return args

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, computed exactly as Meta's FeedForward does (or as a config gives it)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The per-pair rotation speeds; Meta stores this vector as ``rope.freqs``. Llama 3.1's
    ``scaling`` slows the low frequencies by ``factor`` and blends the middle band, so the model
    reaches past the context it was pretrained on."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if not scaling:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen < old / high, freqs, torch.where(wavelen > old / low, freqs / factor, blended))


def precompute_rope(head_dim: int, end: int, theta: float, device=None, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, [end, head_dim/2], float32 (real-valued: mps has no complex)."""
    angles = torch.outer(torch.arange(end).float(), rope_frequencies(head_dim, theta, scaling))
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) as Meta's complex multiply does. x: [B, T, H, D];
    cos, sin: [T, D/2], or [B, T, D/2] where each row has positions of its own (packed examples)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- dropout

class SeededDropout:
    """Dropout whose masks are a pure function of (seed, step, micro-batch, layer, site).

    The backward pass recomputes each block from its saved input; drawing the masks from a
    generator seeded by that key gives the recompute exactly the forward's masks, on any device,
    without saving RNG state, and a resumed run draws the same masks as an uninterrupted one.
    """

    def __init__(self, p: float, seed: int, step: int):
        self.p, self.seed, self.step = p, seed, step

    def key(self, layer: int | str, site: str, micro: int = 0) -> int:
        """(A step's first micro-batch keeps the key of a step without micro-batches.)"""
        text = f"{self.seed}/{self.step}/{layer}/{site}{f'/m{micro}' if micro else ''}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

    def mask(self, shape, device, layer: int | str, site: str, micro: int = 0) -> torch.Tensor:
        """Keep-mask already scaled by 1/(1-p), float32."""
        device = torch.device(device)
        try:
            gen = torch.Generator(device=device)
        except RuntimeError:  # a backend without device generators: draw on the cpu
            gen, device_draw = torch.Generator(), torch.device("cpu")
        else:
            device_draw = device
        gen.manual_seed(self.key(layer, site, micro))
        keep = torch.rand(shape, generator=gen, device=device_draw) >= self.p
        return (keep.float() / (1.0 - self.p)).to(device)

    def apply(self, x: torch.Tensor, layer: int | str, site: str, micro: int = 0) -> torch.Tensor:
        return x * self.mask(x.shape, x.device, layer, site, micro).to(x.dtype)

    def at(self, layer: int | str, micro: int = 0):
        """The dropout function for one layer and micro-batch: ``drop(x, site)``."""
        return lambda x, site: self.apply(x, layer, site, micro)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated for the whole sequence."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.k[:, start:end], self.v[:, start:end] = k, v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, drop=None, mask=None):
        """``mask``: which keys each query sees, bool [B, 1, T, S] (packed examples: causal within
        each example); None: causal over the whole row."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        # grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads)
        rep = self.n_heads // self.n_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rep > 1:  # (a copy of each: not made for plain multi-head attention)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if mask is None and T > 1:  # causal; with a cache, query t sees keys up to start_pos + t
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        if drop is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # spelled out so the dropout mask on the probabilities is ours, not the kernel's
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = drop(F.softmax(scores, dim=-1).type_as(q), "attn_probs")
            out = probs @ v
        out = self.wo(out.transpose(1, 2).reshape(B, T, -1))
        return out if drop is None else drop(out, "attn_out")


def swiglu(x1: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """The FFN's gated activation, from the outputs of w1 and w3 (in silu's output where no
    graph needs it: one FFN-wide temporary less)."""
    a = F.silu(x1)
    return a * x3 if torch.is_grad_enabled() and (x1.requires_grad or x3.requires_grad) else a.mul_(x3)


def swiglu_grads(g: torch.Tensor, x1: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of swiglu(x1, x3) given its output's ``g``, by hand so that a backward can start
    from w1's and w3's outputs and keep nothing else of the FFN; the ops autograd would run, so
    the same numbers in every dtype. ``g`` is consumed: x1's gradient is made in its memory."""
    g3 = F.silu(x1).mul_(g)
    g.mul_(x3)
    return torch.ops.aten.silu_backward.grad_input(g, x1, grad_input=g), g3


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x, drop=None):
        out = self.w2(swiglu(self.w1(x), self.w3(x)))
        return out if drop is None else drop(out, "ffn_out")


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, drop=None, split: bool = False, mask=None):
        """The block's output; with ``split``, (h, x1, x3) where the FFN's gate starts, the output
        being ``h + w2(swiglu(x1, x3))`` (then dropout). A backward recompute stops there: it
        needs w2's input, not its product (~5 % of a block's training step), and takes the
        gate's gradients by hand (swiglu_grads) rather than keep its activations for autograd."""
        h = x + self.attention(self.attention_norm(x), rope, start_pos, cache, drop, mask)
        if split:
            ffn, x = self.feed_forward, self.ffn_norm(h)
            return h, ffn.w1(x), ffn.w3(x)
        return h + self.feed_forward(self.ffn_norm(h), drop)


class Head(nn.Module):
    """Final norm and output projection: stored and updated together as one unit."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()


class Transformer(nn.Module):
    """The whole model in memory (state_dict keys are Meta's): for random init and in-RAM baselines."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:  # one tensor in both roles (its state_dict lists it once, as the embedding)
            del self.output.weight
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, block_fn=None) -> torch.Tensor:
        """Logits [B, T, V]; ``block_fn(block, h, rope)`` lets a caller wrap each block (checkpointing)."""
        h = self.tok_embeddings(tokens)
        a = self.args
        rope = precompute_rope(a.head_dim, tokens.shape[1], a.rope_theta, tokens.device, a.rope_scaling)
        for block in self.layers:
            h = block_fn(block, h, rope) if block_fn else block(h, rope)
        return self.output(self.norm(h)).float()


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: query t sees key s where both belong to one example and s <= t."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, :, None] == segments[:, None, :]).logical_and_(causal)[:, None]


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] each token's position within its example, restarting at 0 where a segment begins
    (rows packed with several examples: each is placed as if it were alone)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


def packed_rope(rope: tuple[torch.Tensor, torch.Tensor], segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary angles [B, T, D/2] of rows packed with examples: by position within each example."""
    pos = packed_positions(segments)
    return rope[0][pos], rope[1][pos]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is >= 0 (-1 here, -100 in torch and
    Hugging Face: both are left out)."""
    t = targets.reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.masked_fill(t < 0, -1), ignore_index=-1)


@torch.no_grad()
def mean_loss(logits_fn, tokens: torch.Tensor, targets: torch.Tensor, batch: int,
              segments: torch.Tensor | None = None) -> float:
    """The mean cross-entropy over the targets >= 0 of many rows, ``batch`` rows at a time
    (``logits_fn(tokens)`` -> [B, T, V]): a held-out loss, whatever holds the model. Rows packed
    with examples pass their ``segments`` on (``logits_fn(tokens, segments)``), so that each
    example is scored as if alone."""
    total = 0.0
    for i in range(0, tokens.shape[0], batch):
        rows = (tokens[i : i + batch],) if segments is None else (tokens[i : i + batch], segments[i : i + batch])
        logits, t = logits_fn(*rows), targets[i : i + batch].reshape(-1)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t.masked_fill(t < 0, -1).to(logits.device),
                                 ignore_index=-1, reduction="sum").item()
    return total / max(1, int((targets >= 0).sum()))
