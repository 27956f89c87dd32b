"""Independent references the tests check slowft against.

``RefLlama`` is Meta's llama2 forward written the way Meta's reference code is (complex
``freqs_cis`` rotary, ``repeat_kv``, explicit causal mask), holding the whole model in RAM under
Meta's checkpoint keys. It shares no code with slowft.model, so it also checks the architecture.
``adalite_step`` is the formula from the Adalite issue applied to dense gradients, unfused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slowft.formats.meta import split_dim


def load_meta(folder, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """All shards of a Meta folder merged into full tensors."""
    from pathlib import Path

    paths = sorted(Path(folder).glob("consolidated.*.pth"))
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    out = {}
    for k in shards[0]:
        d = split_dim(k)
        out[k] = (shards[0][k] if d is None else torch.cat([s[k] for s in shards], dim=d)).to(dtype)
    return out


def hidden_dim(p: dict) -> int:
    h = int(2 * 4 * p["dim"] / 3)
    if p.get("ffn_dim_multiplier") is not None:
        h = int(p["ffn_dim_multiplier"] * h)
    m = p["multiple_of"]
    return m * ((h + m - 1) // m)


class RefLlama(torch.nn.Module):
    def __init__(self, params: dict, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.p = params
        self.w = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v.clone().float())
                                         for k, v in weights.items() if k != "rope.freqs"})

    def W(self, key):
        return self.w[key.replace(".", "__")]

    def named_meta(self):
        return {k.replace("__", "."): v for k, v in self.w.items()}

    def rmsnorm(self, x, weight):
        eps = self.p.get("norm_eps", 1e-5)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight

    def freqs_cis(self, T):
        hd = self.p["dim"] // self.p["n_heads"]
        theta = self.p.get("rope_theta", 10000.0)
        freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        return torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    @staticmethod
    def rotary(x, fc):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fc[None, :, None, :]).flatten(3).type_as(x)

    def forward(self, tokens, drop=None):
        """drop(x, layer, site) -> x applies dropout at the four sites slowft uses."""
        p = self.p
        B, T = tokens.shape
        nh, nkv = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
        hd = p["dim"] // nh
        h = F.embedding(tokens, self.W("tok_embeddings.weight"))
        if drop:
            h = drop(h, "emb", "out")
        fc = self.freqs_cis(T)
        mask = torch.full((T, T), float("-inf")).triu(1)
        for i in range(p["n_layers"]):
            L = lambda n: self.W(f"layers.{i}.{n}")
            x = self.rmsnorm(h, L("attention_norm.weight"))
            q = (x @ L("attention.wq.weight").T).view(B, T, nh, hd)
            k = (x @ L("attention.wk.weight").T).view(B, T, nkv, hd)
            v = (x @ L("attention.wv.weight").T).view(B, T, nkv, hd)
            q, k = self.rotary(q, fc), self.rotary(k, fc)
            rep = nh // nkv
            k = k[:, :, :, None, :].expand(B, T, nkv, rep, hd).reshape(B, T, nh, hd)  # repeat_kv
            v = v[:, :, :, None, :].expand(B, T, nkv, rep, hd).reshape(B, T, nh, hd)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
            probs = F.softmax(scores.float(), dim=-1)
            if drop:
                probs = drop(probs, i, "attn_probs")
            att = (probs @ v).transpose(1, 2).reshape(B, T, -1) @ L("attention.wo.weight").T
            if drop:
                att = drop(att, i, "attn_out")
            h = h + att
            x = self.rmsnorm(h, L("ffn_norm.weight"))
            ffn = (F.silu(x @ L("feed_forward.w1.weight").T) * (x @ L("feed_forward.w3.weight").T)) @ L("feed_forward.w2.weight").T
            if drop:
                ffn = drop(ffn, i, "ffn_out")
            h = h + ffn
        return self.rmsnorm(h, self.W("norm.weight")) @ self.W("output.weight").T


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


@torch.no_grad()
def adalite_step(params: dict[str, torch.Tensor], state: dict, t: int, lr: float, eps=1e-5, Lambda=0.01,
                 beta_decay=0.8, centralize=True, use_rms=True, trust="update") -> None:
    """The Adalite formula (issue #3) on every parameter, after a full backward; ``trust``
    "gradient" is the published trust ratio |p| / |g|, "update" LAMB's |p| / |update|."""
    for name, p in params.items():
        g = p.grad
        if p.dim() == 2 and centralize:
            g = g - g.mean(dim=1, keepdim=True)
        beta_t = 1 - t ** (-beta_decay)
        u = g * g
        if p.dim() == 2:
            c = state.get(name, torch.zeros(p.shape[1]))
            u = (1 - beta_t) * u + beta_t * c[None, :]
            u = u + eps
            state[name] = u.mean(dim=0)
        else:
            v = state.get(name, torch.zeros_like(p))
            u = (1 - beta_t) * u + beta_t * v
            u = u + eps
            state[name] = u
        m = g / torch.sqrt(u)
        if use_rms:
            m = m / max(1.0, float(torch.sqrt(torch.mean(m * m))))
        pn, gn = torch.linalg.norm(p), torch.linalg.norm(g if trust == "gradient" else m)
        if pn != 0 and gn != 0:
            m = m * (pn / gn)
            m = m + Lambda * (p - p / pn)
        p -= lr * m


def llama3_scaled(freqs: torch.Tensor, s: dict) -> torch.Tensor:
    """Meta's apply_scaling, element by element as its reference code loops."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    """Hugging Face's llama forward, the way transformers' modeling_llama computes it: straight
    from a folder's config.json and safetensors (q and k as HF stores them, permuted), halves
    rotated (``rotate_half``), the head tied to the embedding where config.json says so."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    c = json.loads((folder / "config.json").read_text())
    w = {}
    for f in folder.glob("*.safetensors"):
        w.update({k: v.float() for k, v in load_file(f).items()})
    nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd, eps = d // nh, c["rms_norm_eps"]
    B, T = tokens.shape
    inv = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    if c.get("rope_scaling"):
        inv = llama3_scaled(inv, c["rope_scaling"])
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rotate_half(x):
        return torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), dim=-1)

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    h = w["model.embed_tokens.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"]
        x = norm(h, p("input_layernorm"))
        q = (x @ p("self_attn.q_proj").T).view(B, T, nh, hd).transpose(1, 2)
        k = (x @ p("self_attn.k_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        v = (x @ p("self_attn.v_proj").T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        probs = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        h = h + (probs @ v).transpose(1, 2).reshape(B, T, -1) @ p("self_attn.o_proj").T
        x = norm(h, p("post_attention_layernorm"))
        h = h + (F.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else w["lm_head.weight"]
    return norm(h, w["model.norm.weight"]) @ head.T
