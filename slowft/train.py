"""One training step with the weights on SSD: forward saving each block's input, then a manual
backward, last unit first, that recomputes the unit, updates it at once and writes it back.

Only one unit's gradients ever exist: each parameter is updated by a hook the moment autograd has
its gradient (LOMO), then the gradient is dropped. Dropout masks come from ``SeededDropout``, so
the recompute sees the forward's masks.

Crash safety: units are updated head first, then blocks top-down, then the embedding. Every few
units the journal records how many are done and the gradient flowing into the next one, after
their new files are durable. A resumed step rebuilds the missing block inputs with a forward
through the units not yet updated (the embedding is updated last, so that forward is exactly the
original one) and carries on from the journaled gradient, giving bit-identical weights.
"""
from __future__ import annotations

import hashlib
import math
import time

import torch

from . import faults
from .errors import Interrupted, NonFiniteError, SlowftError
from .model import SeededDropout, cross_entropy

SYNC_EVERY_S = 600.0  # resident mode: how often the in-RAM weights are committed to the work dir


def batch_id(tokens: torch.Tensor, targets: torch.Tensor) -> str:
    h = hashlib.sha256(tokens.cpu().numpy().tobytes())
    h.update(targets.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _optim_state(master: dict, name: str, optimizer) -> dict:
    prefix = f"optim.{name}."
    state = {k[len(prefix):]: v for k, v in master.items() if k.startswith(prefix)}
    if not state:
        state = optimizer.init_state(master[name])
        master.update({prefix + k: v for k, v in state.items()})
    return state


def backward_unit(model, unit: str, fn, inp: torch.Tensor, g_out: torch.Tensor | None, optimizer, t: int):
    """Recomputes ``fn(weights, inp)``, backpropagates ``g_out`` (or the loss, when ``g_out`` is None)
    and updates the unit's weights in place as each gradient arrives. Returns (grad of inp, output)."""
    master = model.cache.get(unit, for_update=True)
    bad: list[torch.Tensor] = []
    params = {}
    for name in [k for k in master if not k.startswith("optim.")]:
        m = master[name]
        p = (m.detach() if m.dtype == model.compute_dtype else m.to(model.compute_dtype)).requires_grad_(True)

        def on_grad(p, name=name):
            g, p.grad = p.grad, None
            bad.append(~torch.isfinite(g).all())
            optimizer.update(master[name], g, _optim_state(master, name, optimizer), t)

        p.register_post_accumulate_grad_hook(on_grad)
        params[name] = p
    x = inp.detach().requires_grad_(inp.is_floating_point())
    out = fn(params, x)
    if g_out is None:
        if not torch.isfinite(out):
            model.cache.release(unit)
            raise NonFiniteError(f"loss is {out.item()} at step {t}; nothing was updated. Try a lower --lr")
        out.backward()
    else:
        out.backward(g_out)
    if bad and torch.stack(bad).any():
        model.cache.release(unit)
        model.cache.drop(unit)
        raise NonFiniteError(f"non-finite gradient in {unit} at step {t}; stopped before writing it. Try a lower --lr")
    model.cache.release(unit, updated=True)
    return x.grad, out.detach()


def _commit_every(model, x_bytes: int) -> int | None:
    """Units between journal commits: the journaled gradient costs at most ~2% of the units' writes."""
    if model.cache.resident:
        return None
    block = max(model.unit_bytes[u] for u in model.layer_units)
    return max(1, min(4, math.ceil(x_bytes / (0.02 * block))))


def _commit_mid_step(model, t: int, done: int, g: torch.Tensor, loss: float, batch: str) -> None:
    model.commit({"done": done, "grad": f"grad.s{t:06d}.u{done:03d}", "loss": loss, "batch": batch}, g)


def _stop(model, t: int, done: int, g, loss, batch: str, total: int):
    """Ctrl-C: make the work dir consistent with what is in memory, then raise Interrupted."""
    if done == 0:
        if model.cache.dirty:
            model.commit(model.sweep, None)
    elif model.sweep is None or model.sweep["done"] != done:
        _commit_mid_step(model, t, done, g, loss, batch)
    model.io.drain()
    raise Interrupted(f"stopped at step {t + 1} with {done} of {total} units updated")


def train_step(model, tokens: torch.Tensor, targets: torch.Tensor, optimizer, dropout: float = 0.0, seed: int = 0) -> float:
    if tokens.dim() != 2 or targets.shape != tokens.shape:
        raise SlowftError(f"step: tokens and targets must both be [batch, seq]; got {list(tokens.shape)} and {list(targets.shape)}")
    args, cache = model.args, model.cache
    B, T = tokens.shape
    if T > args.max_seq_len:
        raise SlowftError(f"--seq-len {T}: above the model's limit of {args.max_seq_len}")
    tokens, targets = tokens.to(model.device), targets.to(model.device)
    t = model.step_count
    batch = batch_id(tokens, targets)
    sweep = model.sweep
    if sweep is not None and sweep["batch"] != batch:
        raise SlowftError(f"{model.store.root}: the unfinished step {t} used a different batch; resume with the same --data, --seed, --batch-size and --seq-len")
    done = sweep["done"] if sweep else 0
    L = args.n_layers
    bwd = model.backward_order()  # head, layers.L-1 ... layers.0, tok_embeddings
    drop = SeededDropout(dropout, seed, t) if dropout > 0 else None
    at = (lambda layer: drop.at(layer)) if drop else (lambda layer: None)
    rope = model.rope(T)
    x_bytes = B * T * args.dim * model.compute_dtype.itemsize
    model.configure_memory(x_bytes)
    every = _commit_every(model, x_bytes)

    # forward through the units not yet updated this step (all of them, unless resuming mid-step)
    n_run = L if done == 0 else max(0, L - done)
    n_inputs = L if done == 0 else (L - done + 1 if done <= L else 0)
    forward = ["tok_embeddings", *model.layer_units[:n_run]] + (["head"] if done == 0 else [])
    cache.plan((forward if n_inputs or done == 0 else []) + bwd[done:])
    model.inputs.start(n_inputs, x_bytes)
    h = None
    try:
        with torch.no_grad():
            if n_inputs or done == 0:
                h = model.run_unit("tok_embeddings", model.embed_fn, tokens, at("emb"))
                for i in range(n_run):
                    if model.stop_requested:
                        _stop(model, t, done, None, None, batch, len(bwd))
                    model.inputs.save(i, h)
                    faults.hit("forward_block")
                    h = model.run_unit(f"layers.{i}", model.block_fn, h, rope, 0, None, at(i))
                if done > 0 and n_run < L:
                    model.inputs.save(n_run, h)

        # backward, updating each unit as soon as its gradients exist
        if done == 0:
            loss = None
            g = None
        else:
            loss = sweep["loss"]
            g = model.store.read_scratch(sweep["grad"], "grads").to(model.device)
        last_commit = done
        for k in range(done, len(bwd)):
            unit = bwd[k]
            if model.stop_requested:
                _stop(model, t, k, g, loss, batch, len(bwd))
            faults.hit("backward_unit")
            if unit == "head":
                g, out = backward_unit(model, unit, lambda w, x: cross_entropy(model.head_fn(w, x), targets), h, None, optimizer, t + 1)
                loss = out.item()
            elif unit == "tok_embeddings":
                backward_unit(model, unit, lambda w, tok: model.embed_fn(w, tok, at("emb")), tokens, g, optimizer, t + 1)
            else:
                i = int(unit.split(".")[1])
                model.inputs.prefetch(i)
                if i > 0:
                    model.inputs.prefetch(i - 1)
                x = model.inputs.load(i)
                g, _ = backward_unit(model, unit, lambda w, x, i=i: model.block_fn(w, x, rope, 0, None, at(i)), x, g, optimizer, t + 1)
            if every and k + 1 - last_commit >= every and k + 1 < len(bwd):
                _commit_mid_step(model, t, k + 1, g, loss, batch)
                last_commit = k + 1
    except NonFiniteError:
        model.io.drain()
        raise

    model.step_count, model.sweep = t + 1, None
    model.inputs.clear()
    if not cache.resident or time.monotonic() - model.last_sync >= model.sync_every_s:
        model.commit()
        if cache.resident:
            model.last_sync = time.monotonic()
    return float(loss)
