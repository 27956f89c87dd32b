"""The fused math of a training step: a unit's weights and gradients in, its update out, no I/O.

Each class here is one unit opened for one step's update (LOMO): autograd differentiates
compute-dtype copies of its weights, and each weight is updated in place by a hook the moment
its gradient exists, so only one unit's gradients ever exist. A step runs as micro-batches
(gradient accumulation): each micro-batch's gradients are summed into one fp32 accumulator per
weight, and the last micro-batch's arrive together with the sum, for one update. With a single
micro-batch no accumulator exists, and with SGD no block matrix's gradient exists whole either:
the linear layers hand the update a slice of rows at a time.

The step driver (``train``) fetches and releases units, moves activations and journals; it hands
these classes tensors and takes tensors back.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from .model import swiglu, swiglu_grads
from .optim import Rows, row_chunks, rows_of
from .units import is_state, state_prefix

LOGITS_CHUNK_BYTES = 64 << 20  # the head computes the loss this many bytes of logits at a time
W2 = "feed_forward.w2.weight"  # a block's last projection: its gradients are made by hand (BlockUpdate.backward)


def optim_state(master: dict, name: str, optimizer) -> dict:
    """The optimizer's state of weight ``name``, kept in its unit's tensors (made at its first update)."""
    prefix = state_prefix(name)
    state = {k[len(prefix):]: v for k, v in master.items() if k.startswith(prefix)}
    if not state:
        state = optimizer.init_state(master[name])
        master.update({prefix + k: v for k, v in state.items()})
    return state


def weight_rows(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> Rows:
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
    """``F.linear(x, w)`` whose backward gives the update ``w``'s gradient as Rows (weight_rows),
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
        ctx.update(weight_rows([(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))]))
        return gx, None, None


class _SlicedLinears(TorchFunctionMode):
    """While a block's update runs its forward: each ``F.linear`` on one of its matrices (a block
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


class UnitUpdate:
    """A unit's stored tensors (``master``) opened for one fused update. ``take(name, g)`` gets
    one micro-batch's gradient of a weight: summed into an fp32 accumulator, or, with the step's
    last micro-batch (``last``), added to that sum and handed to the optimizer, which updates the
    weight in place a slice of rows at a time (``write_for(name)`` rounds what it stores).
    Non-finite gradients are noted (``finite``), for the driver to keep them off the disk.
    ``reduce`` (data-parallel: sums a gradient over the ranks, in place) is applied to each
    weight's whole-step gradient before the optimizer sees it."""

    def __init__(self, master: dict, optimizer, t: int, write_for=None, reduce=None):
        self.master, self.optimizer, self.t, self.reduce = master, optimizer, t, reduce
        self.write_for = write_for or (lambda name: None)
        self.acc: dict[str, torch.Tensor] = {}
        self.bad: list[torch.Tensor] = []
        self.last = True

    def take(self, name: str, g: torch.Tensor | Rows) -> None:
        acc = self.acc.get(name)
        if not self.last:
            if acc is None:
                p = self.master[name]
                acc = self.acc[name] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            if isinstance(g, torch.Tensor):
                acc.add_(g)
            else:
                for a, b in row_chunks(acc):
                    acc[a:b].add_(g(a, b))
            return
        rows = rows_of(g) if isinstance(g, torch.Tensor) else g
        if acc is not None:
            del self.acc[name]
            part = rows
            rows = lambda a, b: acc[a:b] + part(a, b)  # noqa: E731
        self._update(name, rows)

    def _update(self, name: str, rows: Rows) -> None:
        bad = self.bad
        if self.reduce is not None:
            rows = self._summed(rows, self.master[name])

        def checked(a: int, b: int) -> torch.Tensor:
            ga = rows(a, b)
            bad.append(~torch.isfinite(ga.sum()))  # one pass; NaN and inf survive a sum
            return ga

        self.optimizer.update(self.master[name], checked, optim_state(self.master, name, self.optimizer), self.t,
                              write=self.write_for(name), state_write=lambda key: self.write_for(state_prefix(name) + key))

    def _summed(self, rows: Rows, p: torch.Tensor) -> Rows:
        """The gradient summed over the ranks, in fp32: a slice at a time as the optimizer asks for
        it, where it asks for each once; else whole, once (a slice asked for twice would be summed
        twice), a gradient as large as the weight."""
        reduce = self.reduce
        if self.optimizer.passes == 1:
            return lambda a, b: reduce(rows(a, b).float())  # (a slice is never asked for again: summed in place)
        g = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        for a, b in row_chunks(p):
            g[a:b] = rows(a, b)
        return rows_of(reduce(g))

    def finite(self) -> bool:
        return not (self.bad and bool(torch.stack(self.bad).any()))


def _on_grad(updates: UnitUpdate, name: str, p: torch.Tensor) -> None:
    g, p.grad = p.grad, None
    if g is not None:  # (None: a matrix routed through _SlicedLinears, its gradient already taken)
        updates.take(name, g)


class BlockUpdate:
    """A transformer block: ``forward`` recomputes it from its saved input with autograd up to w1's
    and w3's outputs (w2's product is not needed by backward, the gate's gradients are made by
    hand); ``backward`` takes the output's gradient and returns the input's. With ``train``
    False (a frozen block) it passes the gradient down and updates nothing. The updates live in
    a UnitUpdate of their own, which the weights' hooks refer to: a hook referring to this object,
    which holds the weights, would make a cycle that keeps the unit's buffer alive until Python's
    garbage collector runs."""

    def __init__(self, master: dict, compute_dtype: torch.dtype, block_fn, optimizer, t: int,
                 write_for=None, train: bool = True, reduce=None):
        self.updates = UnitUpdate(master, optimizer, t, write_for, reduce)
        self.master, self.passes = master, optimizer.passes
        self.compute_dtype, self.block_fn, self.train = compute_dtype, block_fn, train

    def finite(self) -> bool:
        return self.updates.finite()

    @functools.cached_property
    def params(self) -> dict[str, torch.Tensor]:
        """Compute-dtype views (copies, where dtypes differ) of the weights, each hooked once to
        update itself the moment autograd has its gradient (matrices routed through
        _SlicedLinears get theirs as Rows instead, and never reach the hook)."""
        cd = self.compute_dtype
        params = {name: (m.detach() if m.dtype == cd else m.to(cd)).requires_grad_(self.train)
                  for name, m in self.master.items() if not is_state(name)}
        if self.train:
            for name, p in params.items():
                if name != W2:
                    p.register_post_accumulate_grad_hook(functools.partial(_on_grad, self.updates, name))
        return params

    def forward(self, inp: torch.Tensor, rope, drop=None, output: bool = False, need_input: bool = True, mask=None):
        """Runs the block on ``inp`` for a backward to follow; with ``output``, returns the block's
        output too (its rest made outside autograd: the top block's forward, whose backward
        follows the head's without a recompute)."""
        self.x = inp.detach().requires_grad_(need_input)
        matrices = {}  # id -> its update; _SlicedLinears takes out each one it routes
        if self.train and self.passes == 1:
            matrices = {id(p): functools.partial(self.updates.take, name) for name, p in self.params.items()
                        if p.dim() == 2 and name != W2}
        with torch.enable_grad(), _SlicedLinears(matrices) if matrices else contextlib.nullcontext():
            self.out = h, x1, x3 = self.block_fn(self.params, self.x, rope, drop=drop, split=True, mask=mask)
        self.drop = drop
        if not output:
            return None
        with torch.no_grad():
            y = F.linear(swiglu(x1, x3), self.params[W2])
            return h + (y if drop is None else drop(y, "ffn_out"))

    def backward(self, g_out: torch.Tensor, last: bool = True) -> torch.Tensor | None:
        """Backpropagates ``g_out`` through what forward() computed; ``last``: this is the step's
        last micro-batch, so the weights are updated as their gradients arrive. Returns the
        input's gradient. w2's and the gate's gradients are made here (w2's input's from w2 before
        its update), the gate's activation only while w2's gradient needs it; autograd goes on
        from the graph's edges, w1's and w3's outputs gone (their backward needs their input)."""
        self.updates.last = last
        edges = [get_gradient_edge(t) for t in self.out]
        _, x1, x3 = (t.detach() for t in self.out)
        self.out = None
        g = g_out if self.drop is None else self.drop(g_out, "ffn_out")  # x * mask: gradient g * mask
        g_a = g @ self.params[W2].detach()
        if self.train:
            a = swiglu(x1, x3).reshape(-1, g_a.shape[-1])
            g = g.reshape(-1, g.shape[-1])
            self.updates.take(W2, weight_rows([(g, a)]) if self.passes == 1 else g.T @ a)
            del a
        del g
        g1, g3 = swiglu_grads(g_a, x1, x3)
        del g_a, x1, x3
        torch.autograd.backward(edges, [g_out, g1, g3])
        x, self.x = self.x, None
        return x.grad


class HeadUpdate(UnitUpdate):
    """The final norm and output projection: the loss and its gradient, a micro-batch at a time
    (``micro``), a chunk of tokens at a time so the [tokens, vocab] logits never exist whole;
    each chunk's logits become their gradient in place (softmax - one-hot, written out rather
    than left to autograd, which would also make a new [vocab, dim] tensor per chunk). The
    output matrix's gradient is as large as the matrix with llama's vocab: when the step has
    fewer tokens than ``dim`` the chunks' logit gradients are smaller and are kept instead, the
    optimizer taking the matrix's gradient from them a slice of rows at a time; otherwise it is
    summed in place. ``apply`` updates the head once every micro-batch is in."""

    def __init__(self, master: dict, compute_dtype: torch.dtype, norm_fn, optimizer, t: int, n_counted: int,
                 n_tokens: int, write_for=None, train: bool = True, tied: torch.Tensor | None = None,
                 train_output: bool | None = None, reduce=None):
        """``tied``: the embedding matrix, which is the output projection too (its gradient is then
        handed on by ``output_grad``, not applied here); ``train_output``: whether the output
        projection's gradient is wanted (by default as ``train``, the final norm's)."""
        super().__init__(master, optimizer, t, write_for, reduce)
        self.norm_fn, self.train, self.tied = norm_fn, train, tied is not None
        self.train_output = train if train_output is None else train_output
        cd = compute_dtype
        self.W = (tied if self.tied else master["output.weight"]).detach().to(cd)
        self.nw = master["norm.weight"].detach().to(cd).requires_grad_(train)
        self.n = max(1, n_counted)  # the loss is the mean over the whole step's counted targets
        self.keep = n_tokens <= self.W.shape[1]  # tokens <= dim: [tokens, vocab] < [vocab, dim]
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # with keep: (logit gradients, normed input)
        dev = self.W.device
        self.dW = torch.zeros(self.W.shape, device=dev, dtype=torch.float32) if self.train_output and not self.keep else None
        self.dnw = torch.zeros(self.nw.shape, device=dev, dtype=torch.float32)
        self.loss = torch.zeros((), device=dev)

    def micro(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One micro-batch: adds its share to the loss and the head's gradients; returns h's gradient.
        Targets below 0 are not counted."""
        W, nw, n = self.W, self.nw, self.n
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        per = max(1, LOGITS_CHUNK_BYTES // (4 * W.shape[0]))
        g = torch.empty_like(flat_h)
        for s in range(0, flat_h.shape[0], per):
            x, tgt = flat_h[s : s + per].detach().requires_grad_(True), flat_t[s : s + per]
            with torch.enable_grad():
                normed = self.norm_fn(nw, x)
            logits = (normed.detach() @ W.T).float()
            valid = tgt >= 0
            rows, cols = valid.nonzero().squeeze(1), tgt[valid]
            # softmax in place (torch.logsumexp would make a temporary as large as the chunk)
            picked = logits[rows, cols]
            top = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(top).exp_()
            total = grad.sum(dim=-1, keepdim=True)
            self.loss += ((top + total.log()).squeeze(1)[rows] - picked).sum() / n
            grad *= valid[:, None] / (total * n)  # d(sum of losses / n) / d logits = (softmax - one-hot) / n
            grad[rows, cols] -= 1.0 / n
            if self.train_output and self.keep:
                self.kept.append((grad, normed.detach().float()))
            elif self.train_output:
                self.dW.addmm_(grad.T, normed.detach().float())
            wrt = [x, nw] if self.train else [x]
            grads = torch.autograd.grad(normed, wrt, (grad.to(W.dtype) @ W).to(normed.dtype))
            g[s : s + per] = grads[0]
            if self.train:
                self.dnw += grads[1]
            del logits, grad
        return g.view_as(h)

    def output_grad(self) -> Rows | None:
        """The output projection's gradient, a slice of rows at a time (None: not trained)."""
        if not self.train_output:
            return None
        if self.keep:
            return weight_rows(self.kept)
        dW = self.dW
        return lambda a, b: dW[a:b]

    def apply(self) -> None:
        """The head's update, from every micro-batch's gradients (a tied output's is handed on)."""
        if self.train_output and not self.tied:
            self.take("output.weight", self.output_grad())
        if self.train:
            self.take("norm.weight", self.dnw)
        if not self.tied:
            self.kept, self.dW = [], None


class EmbeddingUpdate(UnitUpdate):
    """The embedding's gradient is zero but in the rows of the step's tokens: it is summed over the
    micro-batches into those rows only, and the optimizer gets it a slice of rows at a time, never
    as a dense [vocab, dim] tensor; no compute-dtype copy of the matrix is made."""

    def __init__(self, master: dict, tokens: torch.Tensor, optimizer, t: int, write_for=None, tied: Rows | None = None,
                 reduce=None):
        """``tied``: the gradient of the same matrix in its other use, as the output projection
        (HeadUpdate.output_grad): both are summed for its one update."""
        super().__init__(master, optimizer, t, write_for, reduce)
        self.tied = tied
        self.used = tokens.reshape(-1).unique()  # sorted
        self.sum = torch.zeros(len(self.used), master["weight"].shape[1], device=tokens.device, dtype=torch.float32)

    def micro(self, tokens: torch.Tensor, g_out: torch.Tensor, drop=None) -> None:
        W = self.master["weight"]
        if drop is not None:  # back through the dropout on the embedding's output (recomputed: same mask)
            x = F.embedding(tokens, W).to(g_out.dtype).requires_grad_(True)
            with torch.enable_grad():
                (g_out,) = torch.autograd.grad(drop(x, "out"), x, g_out)
        index = torch.searchsorted(self.used, tokens.reshape(-1))
        self.sum.index_add_(0, index, g_out.reshape(-1, W.shape[1]).float())

    def apply(self) -> None:
        used, total = self.used, self.sum

        def rows(a: int, b: int) -> torch.Tensor:
            hit = (used >= a) & (used < b)
            if self.tied is None:
                out = torch.zeros(b - a, total.shape[1], device=total.device, dtype=total.dtype)
            else:  # a copy: an optimizer may ask for the same rows twice (AdaLomo)
                out = self.tied(a, b).clone()
            out[used[hit] - a] += total[hit]
            return out

        self.take("weight", rows)
