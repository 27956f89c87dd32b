"""What a training step does, and what it will write to the SSD, decided before it runs.

A step's plan: how its batch splits into micro-batches, which units it updates, where its
backward stops. From it and the model's shape follow which activations stay in RAM and which
spill, how often the journal commits, and so the bytes a step writes: ``projected_writes``
gives them by the driver's own rules, from the model's shape alone, so a run can be refused
(``--max-ssd-writes``) before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from .activations import Activations
from .errors import SlowftError
from .checkpoint import unit_params, unit_shapes
from .model import ModelArgs
from .optim import state_bytes
from .store import CATEGORIES
from .units import EMBEDDING, HEAD, backward_order, is_layer, layer, layer_index, layers

COMMIT_FIXED_BYTES = 8 << 20  # what a commit's fsynced files cost beyond their bytes, in writing time
FILE_HEADER = 4096  # a unit's or scratch file's header, padded to a page


@dataclass(frozen=True)
class StepPlan:
    """What a step does beyond its batch: how it splits into micro-batches, which units it
    updates, and how many units of the backward order it runs (it stops below the lowest one it
    updates: no recompute there, and no input gradient)."""

    n_micro: int
    micro: int  # rows of the batch per micro-batch
    trained: frozenset
    stop: int
    lora: bool = False  # the blocks' LoRA adapters learn (the backward reaches block 0), no unit is written

    def key(self) -> str:
        return f"{self.n_micro}x{self.micro}:{','.join(sorted(self.trained))}" + (":lora" if self.lora else "")


def plan_step(n_layers: int, rows: int, micro_batch_size: int | None = None, train_layers=None,
              train_embedding: bool = True, train_head: bool = True, lora: bool = False) -> StepPlan:
    micro = rows if micro_batch_size is None else int(micro_batch_size)
    if micro <= 0 or rows % micro:
        raise SlowftError(f"micro_batch_size {micro_batch_size}: expected a positive divisor of the batch's {rows} rows")
    if lora:  # the head and the blocks pass gradients down to every block's adapters; no unit learns
        return StepPlan(rows // micro, micro, frozenset(), 1 + n_layers, lora=True)
    blocks = range(n_layers) if train_layers is None else sorted(set(train_layers))
    if any(not 0 <= i < n_layers for i in blocks):
        raise SlowftError(f"train_layers {list(blocks)}: expected layers from 0 to {n_layers - 1}")
    trained = {layer(i) for i in blocks} | ({EMBEDDING} if train_embedding else set()) | ({HEAD} if train_head else set())
    if not trained:
        raise SlowftError("step: nothing to train; expected train_layers, train_embedding or train_head to name a unit")
    order = backward_order(n_layers)
    stop = 1 + max(k for k, u in enumerate(order) if u in trained)
    return StepPlan(rows // micro, micro, frozenset(trained), stop)


def lisa_layers(n: int, n_layers: int, seed: int, step: int) -> list[int]:
    """LISA (arXiv 2403.17919): the ``n`` blocks a step trains, sampled by (seed, step)."""
    if not 0 < n <= n_layers:
        raise SlowftError(f"lisa {n}: expected 1 to {n_layers} blocks (the model's layers)")
    key = int.from_bytes(hashlib.blake2b(f"lisa/{seed}/{step}".encode(), digest_size=8).digest(), "little") >> 1
    return sorted(torch.randperm(n_layers, generator=torch.Generator().manual_seed(key))[:n].tolist())


def activation_plan(n_layers: int, plan: StepPlan, done: int) -> tuple[list[int], int, bool]:
    """(the block inputs the backward from its ``done``-th unit reads, the input read only once
    by the next unit, whether the top block keeps its graph from the forward: one micro-batch)."""
    L = n_layers
    trick = done == 0 and plan.n_micro == 1
    bwd = backward_order(L)[done : plan.stop]
    needed = [layer_index(u) for u in bwd if is_layer(u) and not (trick and layer_index(u) == L - 1)]
    return needed + ([L] if done == 0 else []), L if done == 0 else L - done, trick


def split_budget(ram_budget: int, units: int, activations: int) -> tuple[int, int]:
    """(for units, for activations): all units if they fit (no unit I/O at all), then activations."""
    if ram_budget >= units:
        return ram_budget, ram_budget - units
    acts = min(ram_budget, activations)
    return ram_budget - acts, acts


def commit_every(block_bytes: int, x_bytes: int, n_copied: int) -> int:
    """Units between journal commits while streaming. A commit copies the gradients flowing on
    that are in RAM (``n_copied`` micro-batches' of ``x_bytes``; those spilled are written under
    the journal's names in the first place). A commit costs at most ~2% of the units' writes, and
    where it copies a single gradient a crash repeats at most 4 units' backward; where it copies
    many (a large RAM budget), the 2% rule alone decides: they would be SSD writes."""
    every = max(1, math.ceil((n_copied * x_bytes + COMMIT_FIXED_BYTES) / (0.02 * block_bytes)))
    return min(4, every) if n_copied == 1 else every


@dataclass
class Layout:
    """What a projection needs of a model: its shape, its units' file sizes and optimizer state
    bytes (now), the compute dtype and the RAM budget."""

    args: ModelArgs
    unit_bytes: dict
    state_bytes: dict
    compute_dtype: torch.dtype
    ram_budget: int

    @classmethod
    def estimate(cls, args: ModelArgs, storage_dtype: torch.dtype, compute_dtype: torch.dtype, ram_budget: int) -> "Layout":
        """From the shape alone, before any import: each unit's weights and a header."""
        sizes = {u: FILE_HEADER + n * storage_dtype.itemsize for u, n in unit_params(args).items()}
        return cls(args, sizes, dict.fromkeys(sizes, 0), compute_dtype, ram_budget)


def projected_writes(layout: Layout, optimizer, plan: StepPlan, seq_len: int, lora_bytes: int = 0,
                     ranks: bool = False) -> dict[str, int]:
    """Bytes one streaming step writes to the work dir, by the store's categories: the trained
    units with their optimizer state, the activations that spill, the gradients the journal
    copies, the journal (with LoRA, the adapters and their state: ``lora_bytes``; with
    ``ranks``, each commit two-phase: the journal with the next state in it, then that state).
    All 0 where the model fits the RAM budget (it writes only at syncs)."""
    args, K = layout.args, plan.n_micro
    x_bytes = plan.micro * seq_len * args.dim * layout.compute_dtype.itemsize
    unit_budget, act_budget = split_budget(layout.ram_budget, sum(layout.unit_bytes.values()), x_bytes * args.n_layers * K)
    out = dict.fromkeys(CATEGORIES, 0)
    if unit_budget >= sum(layout.unit_bytes.values()):
        return out
    if plan.lora:
        out["lora"] = lora_bytes + FILE_HEADER
    acts = Activations(None, None, None, act_budget)
    acts.start(K, x_bytes, *activation_plan(args.n_layers, plan, 0)[:2])
    shapes = unit_shapes(args)
    for unit in plan.trained:
        out["weights"] += layout.unit_bytes[unit] - layout.state_bytes[unit]
        out["optim"] += sum(state_bytes(optimizer, shape) for shape in shapes[unit].values())
    file = x_bytes + FILE_HEADER
    out["inputs"] = file * sum(acts.spills_input(i, j) for i in range(args.n_layers + 1) for j in range(K))
    out["grads"] = file * (plan.stop - 1) * (K - acts.flow)  # each unit but the last hands a gradient down
    every = commit_every(max(layout.unit_bytes[u] for u in layers(args.n_layers)), x_bytes, acts.flow)
    whole = plan.lora or args.tie_embeddings  # steps that commit only when whole (slowft.train)
    commits = 0 if whole else sum(1 for k in range(plan.stop) if (k + 1) % every == 0 and k + 1 < plan.stop)
    out["grads"] += commits * file * acts.flow
    out["journal"] = commits * journal_bytes(args.n_layers, K) + journal_bytes(args.n_layers, 0)
    out["journal"] *= 3 if ranks else 1
    return out


def reduced_bytes(args: ModelArgs, plan: StepPlan, lora_params: int = 0) -> int:
    """Bytes of gradient a data-parallel step all-reduces (each rank sends and receives about
    this much, whatever the count of ranks): every trained weight's in fp32, or, with LoRA, the
    adapters' (``lora_params`` of them)."""
    if plan.lora:
        return 4 * lora_params
    params = unit_params(args)
    return 4 * sum(params[unit] for unit in plan.trained)


def journal_bytes(n_layers: int, n_grads: int) -> int:
    """A journal.json's size (Store.write_json's format), with ``n_grads`` gradient files named."""
    sweep = {"done": 10, "grads": [f"grad.s000000.u000.m{j:03d}" for j in range(n_grads)], "loss": 1.2345678901234567,
             "batch": "0" * 16} if n_grads else None
    versions = {u: 100000 for u in backward_order(n_layers)}
    return len(json.dumps({"step": 100000, "sweep": sweep, "versions": versions}, indent=1).encode())
