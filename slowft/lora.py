"""LoRA on an SSD-resident base: low-rank adapters for a block's matrices, in RAM, trained with
torch's AdamW while the base units are only ever read.

Each targeted matrix W of each block gets A [rank, in] (Kaiming-uniform, seeded) and B [out,
rank] (zeros), and computes ``x W^T + (alpha / rank) * drop(x) A^T B^T``. The adapters of a
13b model at rank 8 are a few MB, so they and their optimizer state stay in RAM and are
journaled whole with each commit: a LoRA step writes nothing else.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from safetensors.torch import load_file, save_file

from .atomic import write_bytes_atomic
from .checkpoint import export_folder, unit_shapes
from .errors import SlowftError
from .formats.hf import heads_of, hf_key, permute, unpermute
from .model import ModelArgs
from .units import layer, weights_of

TARGETS = {"wq": "attention.wq.weight", "wk": "attention.wk.weight", "wv": "attention.wv.weight",
           "wo": "attention.wo.weight", "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight",
           "w3": "feed_forward.w3.weight"}
DEFAULT_TARGETS = tuple(TARGETS)


def matrix_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """target -> the shape of its matrix in every block."""
    block = unit_shapes(args)[layer(0)]
    return {t: block[name] for t, name in TARGETS.items()}


def check_lora(args: ModelArgs, rank: int, targets) -> tuple[str, ...]:
    """The targets, checked against the model: ValueError naming what does not fit."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target {unknown[0] if unknown else '(none)'}; expected some of {', '.join(TARGETS)}")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank {rank}: expected a positive integer")
    shapes = matrix_shapes(args)
    smallest = min(min(shapes[t]) for t in targets)
    if rank > smallest:
        raise ValueError(f"LoRA rank {rank}: above the smallest targeted matrix's dim {smallest}")
    return targets


def _seed(seed: int, layer: int, target: str) -> int:
    key = f"lora/{seed}/{layer}/{target}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class Adapters:
    """A and B for every targeted matrix of every block (fp32), and their AdamW state."""

    def __init__(self, args: ModelArgs, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
                 dropout: float = 0.0, seed: int = 0, device="cpu"):
        self.targets = check_lora(args, rank, targets)
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout {dropout}: expected a value in [0, 1)")
        self.rank, self.alpha, self.dropout, self.seed = rank, float(alpha if alpha is not None else 2 * rank), dropout, seed
        self.scale = self.alpha / rank
        shapes = matrix_shapes(args)
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(args.n_layers):
            for t in self.targets:
                out, inp = shapes[t]
                a = torch.empty(rank, inp)
                # nn.Linear's (and PEFT's) init: kaiming_uniform_ with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
                bound = 1.0 / math.sqrt(inp)
                a.uniform_(-bound, bound, generator=torch.Generator().manual_seed(_seed(seed, i, t)))
                self.A[i, t] = a.to(device).requires_grad_(True)
                self.B[i, t] = torch.zeros(out, rank, device=device, requires_grad=True)
        self.optimizer: torch.optim.AdamW | None = None

    def config(self) -> dict:
        """What identifies these adapters' shape and init (recorded with a run)."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout, "seed": self.seed}

    def params(self) -> list[torch.Tensor]:
        return [p for key in self.A for p in (self.A[key], self.B[key])]

    def use_optimizer(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        """torch's AdamW over every adapter (made once; a later call sets its hyperparameters)."""
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.params(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                               foreach=False)
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def step(self, reduce=None) -> bool:
        """One AdamW update from the gradients the backward summed (``reduce``: data-parallel, sums
        each over the ranks first); False (nothing updated) where one is not finite."""
        grads = [p.grad for p in self.params() if p.grad is not None]
        for g in grads if reduce is not None else ():
            reduce(g)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def layer(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {TARGETS[t]: (self.A[i, t], self.B[i, t]) for t in self.targets}

    def applied(self, i: int, weights: dict[str, torch.Tensor], drop=None) -> "LoraLinears":
        """A context in which block i, run on ``weights``, takes its adapters' paths too."""
        routes = {id(weights[name]): (name, *ab) for name, ab in self.layer(i).items()}
        return LoraLinears(routes, self.scale, drop)

    def load(self, pairs: dict) -> None:
        """Takes trained (A, B) pairs, as read_peft gives them."""
        with torch.no_grad():
            for key, (a, b) in pairs.items():
                self.A[key].copy_(a)
                self.B[key].copy_(b)

    def delta(self, i: int, target: str) -> torch.Tensor:
        """(alpha / rank) * B A in fp32: what merging adds to the matrix."""
        with torch.no_grad():
            return self.scale * (self.B[i, target].float() @ self.A[i, target].float())

    # -- the journal: everything as one flat fp32 tensor, in a fixed order

    def _state_tensors(self) -> list[torch.Tensor]:
        out = []
        for p in self.params():
            state = self.optimizer.state.get(p, {}) if self.optimizer else {}
            out += [p.detach(), state.get("exp_avg", torch.zeros_like(p)), state.get("exp_avg_sq", torch.zeros_like(p)),
                    torch.as_tensor(state.get("step", 0.0), dtype=torch.float32).reshape(1)]
        return out

    def flat(self) -> torch.Tensor:
        return torch.cat([t.detach().float().reshape(-1).cpu() for t in self._state_tensors()])

    def load_flat(self, flat: torch.Tensor) -> None:
        """Restores weights and AdamW state from ``flat`` (a journaled one); the optimizer must
        exist (use_optimizer) so its state has a home."""
        at = 0
        with torch.no_grad():
            for p in self.params():
                parts = []
                for n in (p.numel(), p.numel(), p.numel(), 1):
                    parts.append(flat[at : at + n].to(p.device))
                    at += n
                p.copy_(parts[0].view_as(p))
                if float(parts[3]) > 0:
                    self.optimizer.state[p] = {"exp_avg": parts[1].view_as(p).clone(), "exp_avg_sq": parts[2].view_as(p).clone(),
                                               "step": torch.tensor(float(parts[3]))}
        if at != flat.numel():
            raise SlowftError(f"journaled LoRA adapters have {flat.numel()} numbers, expected {at}; pass --reset-workdir")


class LoraLinears(TorchFunctionMode):
    """While a block runs: each ``F.linear`` on a targeted matrix (found by identity) gets its
    adapters' path added; ``drop(x, site)`` (seeded dropout, or None) on that path's input, the
    site named after the matrix, so a recompute draws the forward's mask."""

    def __init__(self, routes: dict[int, tuple[str, torch.Tensor, torch.Tensor]], scale: float, drop=None):
        super().__init__()
        self.routes, self.scale, self.drop = routes, scale, drop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.routes:
            x, w = args[0], args[1]
            name, A, B = self.routes[id(w)]
            low = x if self.drop is None else self.drop(x, f"lora.{name}")
            return func(x, w) + self.scale * func(func(low, A.to(x.dtype)), B.to(x.dtype))
        return func(*args, **kwargs)


class LoraBlock:
    """A block whose base is frozen and whose adapters learn: the step driver's BlockUpdate for a
    LoRA step. ``forward`` recomputes the whole block with autograd (adapters' paths included),
    ``backward`` sums the adapters' gradients into their ``.grad`` and returns the input's."""

    def __init__(self, master: dict, compute_dtype: torch.dtype, block_fn, adapters: Adapters, layer: int):
        self.params = {k: (v.detach() if v.dtype == compute_dtype else v.to(compute_dtype)) for k, v in weights_of(master).items()}
        self.block_fn, self.adapters, self.layer = block_fn, adapters, layer

    def finite(self) -> bool:
        return True  # checked on the adapters' gradients, at their update (Adapters.step)

    def forward(self, inp: torch.Tensor, rope, drop=None, output: bool = False, need_input: bool = True, mask=None,
                lora_drop=None):
        self.x = inp.detach().requires_grad_(need_input)
        with torch.enable_grad(), self.adapters.applied(self.layer, self.params, lora_drop):
            self.y = self.block_fn(self.params, self.x, rope, drop=drop, mask=mask)
        return self.y.detach() if output else None

    def backward(self, g_out: torch.Tensor, last: bool = True) -> torch.Tensor | None:
        torch.autograd.backward(self.y, g_out)
        self.y = None
        x, self.x = self.x, None
        return x.grad


# ----------------------------------------------------------------------------- PEFT's layout

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft_prefix(i: int, target: str) -> str:
    """PEFT's name of block i's adapters of ``target``: Hugging Face's module, in PEFT's wrapping."""
    return "base_model.model." + hf_key(f"{layer(i)}.{TARGETS[target]}").removesuffix(".weight")


def _module(target: str) -> str:
    """Hugging Face's module name of a target (q_proj, gate_proj, ...), as PEFT's target_modules say."""
    return hf_key(f"{layer(0)}.{TARGETS[target]}").split(".")[-2]


def write_peft(out_dir: Path, adapters: Adapters, args: ModelArgs, base: str) -> None:
    """adapter_model.safetensors + adapter_config.json as PEFT writes them for a
    LlamaForCausalLM: Hugging Face's module names, B's rows permuted for q and k (as the
    matrices' rows are in that layout, slowft.formats.hf)."""
    tensors = {}
    for (i, t), a in adapters.A.items():
        b, heads = adapters.B[i, t].detach().float().cpu(), heads_of(TARGETS[t], args)
        prefix = _peft_prefix(i, t)
        tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (permute(b, heads) if heads else b).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": adapters.rank,
              "lora_alpha": adapters.alpha, "lora_dropout": adapters.dropout, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(_module(t) for t in adapters.targets), "inference_mode": True}
    with export_folder(Path(out_dir)) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_bytes_atomic(tmp / PEFT_CONFIG, json.dumps(config, indent=2).encode())


def read_peft(folder: Path, args: ModelArgs) -> tuple[dict, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """(settings for Adapters, {(layer, target): (A, B)}) of a PEFT folder for this model."""
    folder = Path(folder)
    try:
        config = json.loads((folder / PEFT_CONFIG).read_bytes())
        weights = load_file(str(folder / PEFT_WEIGHTS))
    except (OSError, ValueError) as e:
        raise SlowftError(f"{folder}: not a PEFT LoRA folder ({str(e).splitlines()[0][:80]}); expected "
                          f"{PEFT_CONFIG} and {PEFT_WEIGHTS}") from None
    by_module = {_module(t): t for t in TARGETS}
    modules = config.get("target_modules") or []
    if config.get("peft_type") != "LORA" or any(m not in by_module for m in modules):
        raise SlowftError(f"{folder / PEFT_CONFIG}: expected a LoRA adapter of llama's projections ({', '.join(by_module)})")
    targets = tuple(t for t in TARGETS if _module(t) in modules)
    pairs = {}
    for i in range(args.n_layers):
        for t in targets:
            prefix = _peft_prefix(i, t)
            try:
                a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
            except KeyError as e:
                raise SlowftError(f"{folder / PEFT_WEIGHTS}: no {e.args[0]}; expected adapters for this model's "
                                  f"{args.n_layers} layers") from None
            heads = heads_of(TARGETS[t], args)
            pairs[i, t] = a.float(), (unpermute(b.float(), heads) if heads else b.float())
    settings = {"rank": int(config["r"]), "alpha": float(config.get("lora_alpha", config["r"])), "targets": targets}
    return settings, pairs


def journal_bytes(args: ModelArgs, rank: int, targets) -> int:
    """Bytes of the adapters with their AdamW state as journaled (Adapters.flat): 3 numbers a
    parameter and a step count per tensor, fp32."""
    shapes = matrix_shapes(args)
    per_layer = sum(3 * rank * (out + inp) + 2 for out, inp in (shapes[t] for t in targets))
    return 4 * per_layer * args.n_layers
