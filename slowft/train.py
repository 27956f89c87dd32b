"""The step driver: one training step with the weights on SSD. It fetches and releases units,
moves each micro-batch's activations, journals and honours Ctrl-C; the arithmetic is
``fused``'s.

A step's batch runs as micro-batches through each unit in turn, so every unit is read once and
written once per step however many tokens the step has (gradient accumulation inside the sweep).
The forward runs the embedding and the blocks, saving each block's input per micro-batch (the
top block keeps its autograd graph instead when there is a single micro-batch: its backward
follows the head's at once). The backward goes head first, then the blocks top-down, then the
embedding: each unit is loaded again, recomputed per micro-batch from its saved input, its
gradients summed, updated once, and written back. It stops below the lowest unit the step
trains: frozen units are read, never written. Dropout masks come from ``SeededDropout``, keyed
by micro-batch too, so the recompute sees the forward's masks.

Crash safety: every few units the journal records how many are done and the gradients flowing
into the next one (a file per micro-batch), after their new files are durable. A resumed step
rebuilds the missing block inputs with a forward through the units not yet updated (the
embedding is updated last, so that forward is exactly the original one) and carries on from the
journaled gradients, giving bit-identical weights.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import faults
from .distributed import fingerprint
from .errors import Interrupted, NonFiniteError, SlowftError
from .fused import BlockUpdate, EmbeddingUpdate, HeadUpdate
from .heap import release_free_heap
from .lora import LoraBlock
from .model import SeededDropout, packed_mask, packed_rope
from .units import EMBEDDING, HEAD, backward_order, is_layer, layer, layer_index, weights_of
from .plan import StepPlan, activation_plan, commit_every, plan_step

SYNC_EVERY_S = 600.0  # resident mode: how often the in-RAM weights are committed to the work dir


def batch_id(tokens: torch.Tensor, targets: torch.Tensor, plan: StepPlan, segments=None) -> str:
    h = hashlib.sha256(tokens.cpu().numpy().tobytes())
    h.update(targets.cpu().numpy().tobytes())
    if segments is not None:
        h.update(segments.cpu().numpy().tobytes())
    h.update(plan.key().encode())
    return h.hexdigest()[:16]


def train_step(model, tokens: torch.Tensor, targets: torch.Tensor, optimizer, dropout: float = 0.0, seed: int = 0,
               micro_batch_size: int | None = None, train_layers=None, train_embedding: bool = True,
               train_head: bool = True, segments: torch.Tensor | None = None) -> float:
    if tokens.dim() != 2 or targets.shape != tokens.shape:
        raise SlowftError(f"step: tokens and targets must both be [batch, seq]; got {list(tokens.shape)} and {list(targets.shape)}")
    if tokens.shape[1] > model.args.max_seq_len:
        raise SlowftError(f"--seq-len {tokens.shape[1]}: above the model's limit of {model.args.max_seq_len}")
    if segments is not None and segments.shape != tokens.shape:
        raise SlowftError(f"step: segments must be [batch, seq] like tokens; got {list(segments.shape)}")
    plan = plan_step(model.args.n_layers, tokens.shape[0], micro_batch_size, train_layers, train_embedding, train_head,
                     lora=model.lora is not None)
    n_counted, first_micro = int((targets >= 0).sum()), 0
    if model.ranks is not None:  # this rank's share of the micro-batches; the loss is still the whole batch's mean
        tokens, targets, segments, first_micro = share(model.ranks, plan, tokens, targets, segments)
        plan = replace(plan, n_micro=plan.n_micro // model.ranks.world)
    return _Step(model, tokens, targets, optimizer, plan, dropout, seed, segments, n_counted, first_micro).run()


def share(ranks, plan: StepPlan, tokens, targets, segments):
    """(tokens, targets, segments, index of the first micro-batch) of this rank's share of a
    step's micro-batches: a consecutive run of them, the same count on every rank."""
    if plan.n_micro % ranks.world:
        raise SlowftError(f"step: {plan.n_micro} micro-batches of {plan.micro} rows; expected a multiple of the "
                          f"{ranks.world} ranks (each takes an equal share)")
    per = plan.n_micro // ranks.world
    rows = slice(ranks.rank * per * plan.micro, (ranks.rank + 1) * per * plan.micro)
    return tokens[rows], targets[rows], segments[rows] if segments is not None else None, ranks.rank * per


def _plan_activations(model, plan: StepPlan, x_bytes: int, done: int) -> bool:
    """Splits the RAM budget and tells the activations what the backward from unit ``done`` will
    read. Returns whether the top block keeps its graph from the forward (one micro-batch)."""
    needed, once, trick = activation_plan(model.args.n_layers, plan, done)
    model.configure_memory(x_bytes, plan.n_micro)
    model.activations.start(plan.n_micro, x_bytes, needed, once)
    return trick


class _Step:
    def __init__(self, model, tokens, targets, optimizer, plan: StepPlan, dropout: float, seed: int, segments,
                 n_counted: int, first_micro: int):
        """``n_counted``: the targets the loss is the mean over (the whole step's, with ranks);
        ``first_micro``: the index of this rank's first micro-batch in the step (for dropout)."""
        self.model, self.optimizer, self.plan, self.seed = model, optimizer, plan, seed
        self.t = model.step_count
        self.ranks, self.first_micro = model.ranks, first_micro
        self.n_counted = n_counted
        self.reduce = self.ranks.reduce_ if self.ranks is not None else None
        every = model.fingerprint_every
        self.digests: dict[str, str] | None = {} if self.ranks and every and (self.t + 1) % every == 0 else None
        self.tokens, self.targets = tokens.to(model.device), targets.to(model.device)
        self.segments = segments.to(model.device) if segments is not None else None
        self.batch = batch_id(self.tokens, self.targets, plan, self.segments)
        sweep = model.sweep
        if sweep is not None and sweep["batch"] != self.batch:
            raise SlowftError(f"{model.store.root}: the unfinished step {self.t} used a different batch or plan; resume with "
                              "the same --data, --seed, --batch-size, --grad-accum, --seq-len and trained layers")
        self.done = sweep["done"] if sweep else 0
        self.loss = sweep["loss"] if sweep else None
        self.drop = SeededDropout(dropout, seed, self.t) if dropout > 0 else None
        self.rope = model.rope(tokens.shape[1])
        self.x_bytes = plan.micro * tokens.shape[1] * model.args.dim * model.compute_dtype.itemsize
        self.bwd = backward_order(model.args.n_layers)[: plan.stop]
        self.acts = model.activations
        self.top: BlockUpdate | None = None  # the top block, its graph kept from the forward
        self.spilled: dict[int, object] = {}  # micro-batch -> the write of its gradient, spilled for a commit
        self.ropes: dict[int, tuple] = {}  # micro-batch -> its packed examples' rotary angles
        # A tied model's embedding is its output projection too: the head's gradient of it waits
        # here until the embedding's own is summed in, for one update at the end of the backward.
        # The step then commits only when it is whole (a crash re-runs it): that gradient is as
        # large as the matrix, too large to journal every few units.
        self.tied = model.args.tie_embeddings
        self.tied_grad = None
        # LoRA: the adapters learn, in RAM (their gradients summed over the whole backward); the
        # step, too, commits only when whole
        self.lora = model.lora
        self.lora_drop = SeededDropout(self.lora.dropout, seed, self.t) if self.lora and self.lora.dropout > 0 else None
        self.whole = self.tied or self.lora is not None

    def at(self, layer_: int | str, j: int):
        return self.drop.at(layer_, self.first_micro + j) if self.drop else None

    def piece(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return x[j * self.plan.micro : (j + 1) * self.plan.micro]

    def rope_of(self, j: int):
        """Micro-batch j's rotary angles: by position in the row, or with packed examples
        (``segments``) by position in each example, which restarts with it (gathered once a step:
        every block's forward and recompute uses them)."""
        if self.segments is None:
            return self.rope
        if j not in self.ropes:
            self.ropes[j] = packed_rope(self.rope, self.piece(self.segments, j))
        return self.ropes[j]

    def mask_of(self, j: int):
        return None if self.segments is None else packed_mask(self.piece(self.segments, j))

    def run(self) -> float:
        m, L, done = self.model, self.model.args.n_layers, self.done
        # Forward through what this step has not updated yet: everything, or when resuming with
        # ``done`` units updated (head, then blocks top-down), blocks 0 .. L-done-1, whose outputs
        # give the input of block L-done. With only the embedding left, nothing.
        n_run = L if done == 0 else max(0, L - done)
        forward = [EMBEDDING, *m.layer_units[:n_run]] if done <= L else []
        trick = _plan_activations(m, self.plan, self.x_bytes, done)
        block = max(m.unit_bytes[u] for u in m.layer_units)
        self.every = None if m.cache.resident or self.whole else commit_every(block, self.x_bytes, self.acts.flow)
        if self.ranks is not None:  # every rank commits at the same units (the two-phase journal)
            self.every = self.ranks.least(self.every or len(self.bwd) + 1)
            self.every = self.every if self.every <= len(self.bwd) else None
        m.cache.plan(forward + ([EMBEDDING] if self.tied else []) + ([HEAD] if done == 0 else []) + self.bwd[done:])
        try:
            if forward:
                self.forward(n_run, trick)
            if done:
                self.load_journaled_grads()
            self.backward()
            if self.lora is not None and not self.lora.step(self.reduce):
                raise NonFiniteError(f"non-finite gradient in the LoRA adapters at step {self.t + 1}; nothing was updated. "
                                     "Try a lower --lr")
        except NonFiniteError:
            m.io.drain()
            raise
        finally:
            if self.top is not None:  # stopped before its backward: let the cache have it back
                m.cache.release(layer(L - 1))
        m.step_count, m.sweep = self.t + 1, None
        self.acts.clear()
        if self.digests is not None:
            self.check_fingerprints()
        commit = not m.cache.resident or time.monotonic() - m.last_sync >= m.sync_every_s
        if self.ranks.any(commit) if self.ranks is not None else commit:
            m.commit()
            if m.cache.resident:
                m.last_sync = time.monotonic()
        return float(self.loss)

    def check_fingerprints(self) -> None:
        """Data-parallel: the units this step updated (or the adapters) are the same on every rank."""
        if self.lora is not None:
            self.digests["lora"] = fingerprint({"flat": self.lora.flat()})
        digest = hashlib.sha256(repr(sorted(self.digests.items())).encode()).hexdigest()[:16]
        self.ranks.check_fingerprints(digest, self.t + 1)

    # -- forward

    @torch.no_grad()
    def forward(self, n_run: int, trick: bool) -> None:
        m, L = self.model, self.model.args.n_layers
        self.forward_embedding()
        for i in range(n_run):
            if m.should_stop():
                self.stop(self.done)
            faults.hit("forward_block")
            if trick and i == L - 1:
                self.top = self.open_block(i)
                h = self.top.forward(self.acts.forward_input(i, 0), self.rope_of(0), self.at(i, 0), output=True, mask=self.mask_of(0),
                                     **self.lora_of(i, 0))
                self.acts.put_input(L, 0, h)
            else:
                self.forward_block(i)

    def forward_embedding(self) -> None:
        """Each micro-batch's rows, gathered before the conversion to the compute dtype (not the
        whole matrix). (Its own function, as forward_block is: a unit's tensors held by a name
        in a loop would outlive the unit's release, a buffer beside the next unit's two.)"""
        m = self.model
        w = m.cache.get(EMBEDDING)
        try:
            for j in range(self.plan.n_micro):
                h = F.embedding(self.piece(self.tokens, j), w["weight"]).to(m.compute_dtype)
                drop = self.at("emb", j)
                self.acts.put_input(0, j, h if drop is None else drop(h, "out"))
        finally:
            m.cache.release(EMBEDDING)

    def forward_block(self, i: int) -> None:
        m, acts, K = self.model, self.acts, self.plan.n_micro
        w = m.weights(m.cache.get(layer(i)))
        try:
            for j in range(K):
                m.progress("forward", i + 1, m.args.n_layers + 1, j, K)
                x = acts.forward_input(i, j)
                if j + 1 < K:
                    acts.prefetch_forward_input(i, j + 1)
                with m.adapted(i, w, self.lora_at(i, j)):
                    y = m.block_fn(w, x, self.rope_of(j), drop=self.at(i, j), mask=self.mask_of(j))
                acts.put_input(i + 1, j, y)
        finally:
            m.cache.release(layer(i))

    # -- backward

    def backward(self) -> None:
        m = self.model
        # Its high point in memory is the head's (dim 1024 with llama's vocab), or where a block
        # outweighs the head (every llama2 size) each block's: the heap's free pages go back before it.
        release_each_block = max(m.unit_bytes[u] for u in m.layer_units) > m.unit_bytes[HEAD]
        for k in range(self.done, len(self.bwd)):
            unit = self.bwd[k]
            if not self.whole and m.should_stop():  # (a tied or LoRA step stops once it is whole)
                self.stop(k)
            faults.hit("backward_unit")
            if unit == HEAD:
                release_free_heap()
                self.backward_head(k)
            elif unit == EMBEDDING:
                self.backward_embedding()
            else:
                if release_each_block:
                    release_free_heap()
                self.backward_block(k, layer_index(unit))
            if self.commits_after(k):
                self.commit_mid_step(k + 1)

    def lora_at(self, i: int, j: int):
        """The LoRA paths' dropout for block i, micro-batch j (None: no dropout there)."""
        return self.lora_drop.at(i, self.first_micro + j) if self.lora_drop else None

    def lora_of(self, i: int, j: int) -> dict:
        return {"lora_drop": self.lora_at(i, j)} if self.lora is not None else {}

    def open_block(self, i: int) -> BlockUpdate:
        m, unit = self.model, layer(i)
        if self.lora is not None:
            return LoraBlock(m.cache.get(unit), m.compute_dtype, m.block_fn, self.lora, i)
        trained = unit in self.plan.trained
        master = m.cache.get(unit, for_update=trained)
        return BlockUpdate(master, m.compute_dtype, m.block_fn, self.optimizer, self.t + 1, m.writer(self.seed, self.t + 1, unit), trained,
                           self.reduce)

    def backward_block(self, k: int, i: int) -> None:
        m, K = self.model, self.plan.n_micro
        need_input = k + 1 < len(self.bwd)
        kept, self.top = self.top, None
        if kept is not None:  # (one micro-batch) its graph kept from the forward: no recompute
            m.cache.advance(layer(i))  # read ahead from here (its forward was long ago)
        u = kept if kept is not None else self.open_block(i)
        for j in range(K):
            if kept is not None:
                g_in = u.backward(self.acts.grad(i, 0))
            else:
                g_in = self.recompute_block(u, k, i, j, need_input)
            if need_input:
                self.put_grad(k, i - 1, j, g_in)
        self.finish(layer(i), u)

    def recompute_block(self, u: BlockUpdate, k: int, i: int, j: int, need_input: bool):
        """Micro-batch j through block i again, from its saved input, and back: the input's
        gradient (the weights updated with the last micro-batch's)."""
        acts, K = self.acts, self.plan.n_micro
        x, g = acts.input(i, j), acts.grad(i, j)
        if j + 1 < K:
            acts.prefetch_input(i, j + 1)
            acts.prefetch_grad(i, j + 1)
        elif i > 0:
            acts.prefetch_input(i - 1, 0)
        self.model.progress("backward", k, len(self.bwd), j, K)
        faults.hit("backward_micro")
        u.forward(x, self.rope_of(j), self.at(i, j), need_input=need_input, mask=self.mask_of(j), **self.lora_of(i, j))
        return u.backward(g, last=j == K - 1)

    def backward_head(self, k: int) -> None:
        m, acts, K, L = self.model, self.acts, self.plan.n_micro, self.model.args.n_layers
        trained = HEAD in self.plan.trained
        tied = m.cache.get(EMBEDDING)["weight"] if self.tied else None
        master = m.cache.get(HEAD, for_update=trained)
        u = HeadUpdate(master, m.compute_dtype, m.norm_fn, self.optimizer, self.t + 1, self.n_counted,
                       self.targets.numel(), m.writer(self.seed, self.t + 1, HEAD), trained, tied,
                       train_output=EMBEDDING in self.plan.trained if self.tied else trained, reduce=self.reduce)
        for j in range(K):
            h = acts.input(L, j)
            g = u.micro(h, self.piece(self.targets, j))
            if k + 1 < len(self.bwd):
                self.put_grad(k, L - 1, j, g)
        if self.tied:  # pinned until its last use: in fp32 storage, u.W is the cache's own buffer
            m.cache.release(EMBEDDING)
        if self.ranks is not None:  # each rank's share of the mean: summed, every rank has the step's loss
            u.loss = self.ranks.total(u.loss)
        if not torch.isfinite(u.loss):
            m.cache.release(HEAD)
            advice = "The weights are still the source's: check the model (or --compute-dtype)" if self.t == 0 else "Try a lower --lr"
            raise NonFiniteError(f"loss is {u.loss.item()} at step {self.t + 1}; nothing was updated. {advice}")
        self.loss = u.loss.item()
        u.apply()
        self.tied_grad = u.output_grad() if self.tied else None
        self.finish(HEAD, u)

    def backward_embedding(self) -> None:
        m = self.model
        u = EmbeddingUpdate(m.cache.get(EMBEDDING, for_update=True), self.tokens, self.optimizer, self.t + 1,
                            m.writer(self.seed, self.t + 1, EMBEDDING), tied=self.tied_grad, reduce=self.reduce)
        for j in range(self.plan.n_micro):
            u.micro(self.piece(self.tokens, j), self.acts.grad(-1, j), self.at("emb", j))
        u.apply()
        self.tied_grad = None
        self.finish(EMBEDDING, u)

    def finish(self, unit: str, u) -> None:
        """Hands the updated unit to write-behind (a frozen one back to the cache, unwritten),
        unless a gradient was not finite: then the in-memory copy is dropped, nothing written."""
        m, trained = self.model, unit in self.plan.trained
        if trained and not u.finite():
            m.cache.release(unit)
            m.cache.drop(unit)
            m.broken = f"step {self.t + 1} stopped part-way at a non-finite gradient in {unit}"
            raise NonFiniteError(f"non-finite gradient in {unit} at step {self.t + 1}; stopped before writing it. Try a lower --lr")
        if trained and self.digests is not None:
            self.digests[unit] = fingerprint(weights_of(u.master))
        m.cache.release(unit, updated=trained)

    # -- the journal

    def flow_index(self, k: int) -> int:
        """The key of the gradients flowing into the k-th unit of the backward."""
        unit = self.bwd[k]
        return layer_index(unit) if is_layer(unit) else -1

    def commits_after(self, k: int) -> bool:
        """Whether the journal commits once the k-th unit of the backward is done."""
        return bool(self.every) and (k + 1 - self.done) % self.every == 0 and k + 1 < len(self.bwd)

    def journal_name(self, k: int, j: int) -> str:
        return f"grad.s{self.t:06d}.u{k:03d}.m{j:03d}"

    def put_grad(self, k: int, i: int, j: int, g: torch.Tensor) -> None:
        """The gradient the k-th unit passes down; spilled where a commit follows under the name the
        journal will give it, so the commit needs no copy of it."""
        journaled = self.journal_name(k + 1, j) if self.commits_after(k) else None
        self.spilled[j] = self.acts.put_grad(i, j, g, journaled)

    def commit_mid_step(self, k: int) -> None:
        """Journals ``k`` units as done, with each micro-batch's gradient flowing on: one kept in
        RAM is written now, one spilled for this commit is waited for, any other (a Ctrl-C between
        commits) is read back and written."""
        i, acts = self.flow_index(k), self.acts
        names = [self.journal_name(k, j) for j in range(self.plan.n_micro)]

        def grad(j: int, name: str):
            if acts.grad_in_ram(j):
                return acts.grad(i, j, keep=True)
            if self.commits_after(k - 1):
                return self.spilled[j]
            return lambda: acts.grad(i, j, keep=True)

        grads = ((name, grad(j, name)) for j, name in enumerate(names))
        self.model.commit({"done": k, "grads": names, "loss": self.loss, "batch": self.batch}, grads)

    def load_journaled_grads(self) -> None:
        m = self.model
        if self.done > len(self.bwd) - 1:
            return
        i = self.flow_index(self.done)
        for j, name in enumerate(m.grad_files):  # the files the journal names (OffloadedModel read them)
            self.acts.put_grad(i, j, m.store.read_scratch(name, "grads").to(m.device))

    def stop(self, k: int):
        """Ctrl-C: make the work dir consistent with what is in memory, then raise Interrupted."""
        m = self.model
        if k == 0:
            if m.cache.dirty or m.ranks is not None:  # (ranks commit together: a journal write where nothing changed)
                m.commit()
        elif m.sweep is None or m.sweep["done"] != k:
            self.commit_mid_step(k)
        m.io.drain()
        raise Interrupted(f"stopped at step {self.t + 1} with {k} of {len(self.bwd)} units updated")
