"""One training step with the weights on SSD: forward saving each block's input, then a manual
backward, last unit first, that recomputes the unit, updates it at once and writes it back. (The
top block's forward keeps its autograd graph instead: its backward follows the head's at once.
A block's recompute stops at w1's and w3's outputs: its backward does not need w2's product.)

Only one unit's gradients ever exist: each parameter is updated by a hook the moment autograd has
its gradient (LOMO), then the gradient is dropped; with SGD, a block matrix's gradient is made a
slice of rows at a time, as the update asks for it, and never exists whole. Dropout masks come
from ``SeededDropout``, so the recompute sees the forward's masks.

Crash safety: units are updated head first, then blocks top-down, then the embedding. Every few
units the journal records how many are done and the gradient flowing into the next one, after
their new files are durable. A resumed step rebuilds the missing block inputs with a forward
through the units not yet updated (the embedding is updated last, so that forward is exactly the
original one) and carries on from the journaled gradient, giving bit-identical weights.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import time

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from . import faults
from .errors import Interrupted, NonFiniteError, SlowftError
from .heap import release_free_heap
from .model import SeededDropout, swiglu, swiglu_grads
from .optim import Rows, rows_of

SYNC_EVERY_S = 600.0  # resident mode: how often the in-RAM weights are committed to the work dir
LOGITS_CHUNK_BYTES = 64 << 20  # the head computes the loss this many bytes of logits at a time
W2 = "feed_forward.w2.weight"  # a block's last projection: its gradients are made by hand (_Update.backward)


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


def _weight_rows(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> Rows:
    """The gradient of ``w`` in ``y = x @ w.T`` from (gradient of y, x) per chunk of tokens, a
    slice of rows at a time: each slice summed over the chunks into one buffer that the next
    reuses (a new tensor per slice left glibc's heap ~120 MB larger in the head)."""
    g0, x0 = chunks[0]
    buf = g0.new_empty(0)

    def rows(a: int, b: int) -> torch.Tensor:
        nonlocal buf
        if buf.shape[0] < b - a:
            buf = g0.new_empty(b - a, x0.shape[1])
        o = buf[: b - a]
        for k, (g, x) in enumerate(chunks):
            o.addmm_(g[:, a:b].T, x, beta=0 if k == 0 else 1)
        return o

    return rows


class _LinearRowsGrad(torch.autograd.Function):
    """``F.linear(x, w)`` whose backward gives the update ``w``'s gradient as Rows (_weight_rows),
    so a matrix's whole gradient never exists (w1's is 0.18 GB at dim 4096 in fp32, 0.9 GB at
    70b). The input's gradient is taken first, from ``w`` not yet updated."""

    @staticmethod
    def forward(ctx, x, w, update):
        ctx.save_for_backward(x, w)
        ctx.update = update
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = g @ w if ctx.needs_input_grad[0] else None
        ctx.update(_weight_rows([(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))]))
        return gx, None, None


class _SlicedLinears(TorchFunctionMode):
    """While a unit's update runs its forward: each ``F.linear`` on one of its matrices (a block
    uses each once) goes through _LinearRowsGrad. Only for an optimizer that takes each slice
    once: one asking twice (Adalite) would pay the weight gradient's matmul twice."""

    def __init__(self, updates: dict):
        super().__init__()
        self.updates = updates  # id(matrix) -> update(rows)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.linear and len(args) >= 2 and id(args[1]) in self.updates
                and (args[2] if len(args) > 2 else kwargs.get("bias")) is None):
            return _LinearRowsGrad.apply(args[0], args[1], self.updates.pop(id(args[1])))
        return func(*args, **kwargs)


class _Update:
    """A unit opened for its fused update: compute-dtype copies of its weights that autograd
    differentiates, and the in-place update of the stored weights as each gradient arrives."""

    def __init__(self, model, unit: str, optimizer, t: int, drop=None):
        self.model, self.unit, self.t, self.drop = model, unit, t, drop
        self.master = model.cache.get(unit, for_update=True)
        self.bad: list[torch.Tensor] = []
        master, bad = self.master, self.bad

        def apply(name: str, g: torch.Tensor | Rows) -> None:  # refers to no parameter: hooks make no cycle
            rows = rows_of(g) if isinstance(g, torch.Tensor) else g

            def checked(a: int, b: int) -> torch.Tensor:
                ga = rows(a, b)
                bad.append(~torch.isfinite(ga.sum()))  # one pass; NaN and inf survive a sum
                return ga

            optimizer.update(master[name], checked, _optim_state(master, name, optimizer), t)

        self.apply = apply
        self.passes = optimizer.passes

    @functools.cached_property
    def params(self) -> dict[str, torch.Tensor]:
        """Made on first use: the embedding's update needs none (a copy, where dtypes differ)."""
        cd = self.model.compute_dtype
        return {name: (m.detach() if m.dtype == cd else m.to(cd)).requires_grad_(True)
                for name, m in self.master.items() if not name.startswith("optim.")}

    def _hook(self, names) -> None:
        """Updates each of these parameters the moment autograd has its gradient (LOMO), then
        drops the gradient."""
        apply = self.apply
        for name in names:
            def on_grad(p, name=name):
                g, p.grad = p.grad, None
                apply(name, g)

            self.params[name].register_post_accumulate_grad_hook(on_grad)

    def run_block(self, inp: torch.Tensor, rope, output: bool) -> torch.Tensor | None:
        """The block (with this update's dropout) with autograd up to w1's and w3's outputs (w2's
        product is not needed by backward, the gate's gradients are made by hand); each weight's
        update hooked to its gradient (a matrix's, where the optimizer takes each slice once,
        given a slice at a time). With ``output``, the block's output, its rest made outside
        autograd (the top block's forward, whose backward follows the head's)."""
        self.x = inp.detach().requires_grad_(True)
        matrices = {}  # id -> its update; _SlicedLinears takes out each one it routes
        if self.passes == 1:
            matrices = {id(p): functools.partial(self.apply, name) for name, p in self.params.items() if p.dim() == 2 and name != W2}
        offered = set(matrices)
        with torch.enable_grad(), _SlicedLinears(matrices) if matrices else contextlib.nullcontext():
            self.out = h, x1, x3 = self.model.block_fn(self.params, self.x, rope, drop=self.drop, split=True)
        routed = offered - set(matrices)
        self._hook(name for name, p in self.params.items() if id(p) not in routed and name != W2)
        if not output:
            return None
        with torch.no_grad():
            y = F.linear(swiglu(x1, x3), self.params[W2])
            return h + (y if self.drop is None else self.drop(y, "ffn_out"))

    def backward(self, g_out: torch.Tensor) -> torch.Tensor | None:
        """Backpropagates ``g_out`` through what run_block() computed, updating the weights as
        their gradients arrive, and hands the unit on; returns the gradient of the input. The
        gradients of w2 and the gate are made here (w2's input's from w2 before its update), the
        gate's activation only while w2's gradient needs it; autograd goes on from the graph's
        edges, w1's and w3's outputs gone (their backward needs their input, not them)."""
        self.model.cache.advance(self.unit)  # read ahead from here (run_block() may have been long ago)
        edges = [get_gradient_edge(t) for t in self.out]
        _, x1, x3 = (t.detach() for t in self.out)
        self.out = None
        g = g_out if self.drop is None else self.drop(g_out, "ffn_out")  # x * mask: gradient g * mask
        g_a = g @ self.params[W2].detach()
        a = swiglu(x1, x3).reshape(-1, g_a.shape[-1])
        g = g.reshape(-1, g.shape[-1])
        self.apply(W2, _weight_rows([(g, a)]) if self.passes == 1 else g.T @ a)
        del g, a
        g1, g3 = swiglu_grads(g_a, x1, x3)
        del g_a, x1, x3
        torch.autograd.backward(edges, [g_out, g1, g3])
        self.finish()
        return self.x.grad

    def finish(self) -> None:
        """Hands the updated unit to write-behind, unless a gradient was not finite: then the
        in-memory copy is dropped and nothing of it is written."""
        if self.bad and torch.stack(self.bad).any():
            self.model.cache.release(self.unit)
            self.model.cache.drop(self.unit)
            self.model.broken = f"step {self.t} stopped part-way at a non-finite gradient in {self.unit}"
            raise NonFiniteError(f"non-finite gradient in {self.unit} at step {self.t}; stopped before writing it. Try a lower --lr")
        self.model.cache.release(self.unit, updated=True)


def backward_block(model, i: int, inp: torch.Tensor, g_out: torch.Tensor, rope, optimizer, t: int, drop=None):
    """Recomputes block ``i`` from its input (with dropout ``drop``), backpropagates ``g_out`` and
    updates its weights in place as each gradient arrives. Returns the gradient of ``inp``."""
    u = _Update(model, f"layers.{i}", optimizer, t, drop)
    u.run_block(inp, rope, output=False)
    return u.backward(g_out)


def backward_head(model, h: torch.Tensor, targets: torch.Tensor, optimizer, t: int):
    """Loss and backward of the final norm and output projection, a chunk of tokens at a time so
    the [tokens, vocab] logits never exist whole; each chunk's logits become their gradient in
    place (softmax - one-hot, written out rather than left to autograd, which would also make a
    new [vocab, dim] tensor per chunk). The output matrix's gradient is as large as the matrix
    with llama's vocab: with fewer tokens than ``dim`` the chunks' logit gradients are smaller,
    and are kept instead, the optimizer taking the matrix's gradient from them a slice of rows at
    a time; otherwise it is accumulated in place. The head is updated once all chunks are in.
    Returns (grad of h, loss as a float)."""
    u = _Update(model, "head", optimizer, t)
    W, nw = u.params["output.weight"].detach(), u.params["norm.weight"]
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    n = (flat_t != -1).sum()
    per = max(1, LOGITS_CHUNK_BYTES // (4 * model.args.vocab_size))
    g = torch.empty_like(flat_h)
    keep = flat_h.shape[0] <= flat_h.shape[1]  # tokens <= dim: [tokens, vocab] < [vocab, dim]
    kept_grads: list[torch.Tensor] = []  # with keep: each chunk's logit gradients and normed inputs
    kept_normed: list[torch.Tensor] = []
    dW = None if keep else torch.zeros(W.shape, device=W.device, dtype=torch.float32)
    dnw = torch.zeros(nw.shape, device=W.device, dtype=torch.float32)
    loss = torch.zeros((), device=h.device)
    for s in range(0, flat_h.shape[0], per):
        x, tgt = flat_h[s : s + per].detach().requires_grad_(True), flat_t[s : s + per]
        normed = model.norm_fn(nw, x)
        logits = (normed.detach() @ W.T).float()
        valid = tgt != -1
        rows, cols = valid.nonzero().squeeze(1), tgt[valid]
        # softmax in place (torch.logsumexp would make a temporary as large as the chunk)
        picked = logits[rows, cols]
        top = logits.amax(dim=-1, keepdim=True)
        grad = logits.sub_(top).exp_()
        total = grad.sum(dim=-1, keepdim=True)
        loss += ((top + total.log()).squeeze(1)[rows] - picked).sum() / n
        grad *= valid[:, None] / (total * n)  # d(sum of losses / n) / d logits = (softmax - one-hot) / n
        grad[rows, cols] -= 1.0 / n
        if keep:
            kept_grads.append(grad)
            kept_normed.append(normed.detach().float())
        else:
            dW.addmm_(grad.T, normed.detach().float())
        gx, gnw = torch.autograd.grad(normed, [x, nw], (grad.to(W.dtype) @ W).to(normed.dtype))
        g[s : s + per] = gx
        dnw += gnw
        del logits, grad
    if not torch.isfinite(loss):
        model.cache.release("head")
        advice = "The weights are still the source's: check the model (or --compute-dtype)" if t == 1 else "Try a lower --lr"
        raise NonFiniteError(f"loss is {loss.item()} at step {t}; nothing was updated. {advice}")

    u.apply("output.weight", _weight_rows(list(zip(kept_grads, kept_normed))) if keep else dW)
    u.apply("norm.weight", dnw)
    u.finish()
    return g.view_as(h), loss.item()


def backward_embedding(model, tokens: torch.Tensor, g_out: torch.Tensor, optimizer, t: int, drop=None) -> None:
    """The embedding's gradient is zero but in the rows of the batch's tokens: the optimizer gets
    it a slice of rows at a time, each built from those tokens, never as a dense [vocab, dim]
    tensor; and no compute-dtype copy of the matrix is made."""
    u = _Update(model, "tok_embeddings", optimizer, t)
    W = u.master["weight"]
    if drop is not None:  # back through the dropout on the embedding's output (recomputed: same mask)
        x = F.embedding(tokens, W).to(g_out.dtype).requires_grad_(True)
        with torch.enable_grad():
            (g_out,) = torch.autograd.grad(drop(x, "out"), x, g_out)
    index, g = tokens.reshape(-1), g_out.reshape(-1, W.shape[1])

    def rows(a: int, b: int) -> torch.Tensor:
        hit = (index >= a) & (index < b)
        return torch.zeros(b - a, g.shape[1], device=g.device, dtype=g.dtype).index_add_(0, index[hit] - a, g[hit])

    u.apply("weight", rows)
    u.finish()


COMMIT_FIXED_BYTES = 8 << 20  # what a commit's two fsynced files cost beyond their bytes, in writing time


def _commit_every(model, x_bytes: int) -> int | None:
    """Units between journal commits: a commit (the gradient, the journal, their fsyncs) costs at
    most ~2% of the units' writes, and a crash repeats at most 4 units' backward."""
    if model.cache.resident:
        return None
    block = max(model.unit_bytes[u] for u in model.layer_units)
    return max(1, min(4, math.ceil((x_bytes + COMMIT_FIXED_BYTES) / (0.02 * block))))


def _commit_mid_step(model, t: int, done: int, g: torch.Tensor, loss: float, batch: str) -> None:
    model.commit({"done": done, "grad": f"grad.s{t:06d}.u{done:03d}", "loss": loss, "batch": batch}, g)


def _stop(model, t: int, done: int, g, loss, batch: str, total: int):
    """Ctrl-C: make the work dir consistent with what is in memory, then raise Interrupted."""
    if done == 0:
        if model.cache.dirty:
            model.commit()
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

    # Forward through what this step has not updated yet: everything, or when resuming with
    # ``done`` units updated (head, then blocks top-down), blocks 0 .. L-done-1, whose outputs give
    # the inputs of blocks 0 .. L-done. With only the embedding left, nothing.
    n_run = L if done == 0 else max(0, L - done)
    n_inputs = L if done == 0 else max(0, L - done + 1)
    forward = (["tok_embeddings", *model.layer_units[:n_run]] + (["head"] if done == 0 else [])) if done <= L else []
    cache.plan(forward + bwd[done:])
    model.inputs.start(n_inputs, x_bytes)
    h = None
    top = None  # the top block runs with autograd in the forward: its backward comes right after the head's, without a recompute
    try:
        with torch.no_grad():
            if forward:
                h = model.embed(tokens, at("emb"))
                for i in range(n_run):
                    if model.stop_requested:
                        _stop(model, t, done, None, None, batch, len(bwd))
                    faults.hit("forward_block")
                    if i == L - 1:  # (only reached when nothing is updated yet)
                        top = _Update(model, f"layers.{i}", optimizer, t + 1, at(i))
                        h = top.run_block(h, rope, output=True)
                    else:
                        model.inputs.save(i, h)
                        h = model.run_unit(f"layers.{i}", model.block_fn, h, rope, 0, None, at(i))
                if 0 < done <= L:
                    model.inputs.save(n_run, h)

        # backward, updating each unit as soon as its gradients exist. Its high point in memory is
        # the head's (dim 1024 with llama's vocab), or where a block outweighs the head (every
        # llama2 size) each block's: the heap's free pages go back before it. (Before every
        # block at dim 1024, batch 1 x 32, that cost +60 % page faults and ~0.35 s of a 5 s step.)
        release_each_block = max(model.unit_bytes[u] for u in model.layer_units) > model.unit_bytes["head"]
        loss, g = (sweep["loss"], model.store.read_scratch(sweep["grad"], "grads").to(model.device)) if done else (None, None)
        last_commit = done
        for k in range(done, len(bwd)):
            unit = bwd[k]
            if model.stop_requested:
                _stop(model, t, k, g, loss, batch, len(bwd))
            faults.hit("backward_unit")
            if unit == "head":
                release_free_heap()
                g, loss = backward_head(model, h, targets, optimizer, t + 1)
            elif unit == "tok_embeddings":
                backward_embedding(model, tokens, g, optimizer, t + 1, at("emb"))
            else:
                if release_each_block:
                    release_free_heap()
                i = int(unit.split(".")[1])
                model.inputs.prefetch(i)
                if i > 0:
                    model.inputs.prefetch(i - 1)
                if top is not None and unit == top.unit:
                    kept, top = top, None
                    g = kept.backward(g)
                    del kept  # its weights would hold the block's buffer until the step ends
                else:
                    x = model.inputs.load(i)
                    g = backward_block(model, i, x, g, rope, optimizer, t + 1, at(i))
            if every and k + 1 - last_commit >= every and k + 1 < len(bwd):
                _commit_mid_step(model, t, k + 1, g, loss, batch)
                last_commit = k + 1
    except NonFiniteError:
        model.io.drain()
        raise
    finally:
        if top is not None:  # stopped before its backward: let the cache have it back
            model.cache.release(top.unit)

    model.step_count, model.sweep = t + 1, None
    model.inputs.clear()
    if not cache.resident or time.monotonic() - model.last_sync >= model.sync_every_s:
        model.commit()
        if cache.resident:
            model.last_sync = time.monotonic()
    return float(loss)
