"""A step's activations, per micro-batch: each block's input saved by the forward for its
recompute in the backward, and the tensor flowing between units (the forward's hidden state,
the backward's gradient).

What is needed soonest stays in RAM while it fits the budget: first the flowing tensors of as
many micro-batches as fit (one always: it is the one in hand), then the saved inputs of the top
blocks, which the backward needs first. The rest spill to scratch files, written once and read
back one ahead of their use; a saved input that also has to flow to the next block in the
forward is read back from its spill file rather than written twice. So memory does not grow
with the number of micro-batches beyond what the budget keeps.
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from .store import Store
from .streaming import IOWorker


class Activations:
    def __init__(self, store: Store, io: IOWorker, device: torch.device, budget: int = 0):
        self.store, self.io, self.device, self.budget = store, io, device, budget
        self.ram: dict[tuple, torch.Tensor] = {}
        self.files: dict[str, Future] = {}  # spilled: name -> its write
        self.grad_names: dict[tuple[int, int], str] = {}
        self.journaled: set[str] = set()  # spilled gradients a journal commit names: their files stay
        self.reading: dict[str, Future] = {}
        self.flow, self.kept, self.needed, self.once = 1, set(), set(), set()

    def start(self, n_micro: int, x_bytes: int, needed: list[int], once: int | None = None) -> None:
        """A new step (or the rest of one): ``needed``, the block inputs its backward reads (top
        first); ``once``, an input read only once, by the next unit (the head's)."""
        self.clear()
        fit = self.budget // max(1, x_bytes)
        self.flow = min(n_micro, 1 + fit)
        fit -= self.flow - 1
        order = [(i, j) for i in sorted(needed, reverse=True) for j in range(n_micro)]
        self.kept, self.needed, self.once = set(order[:fit]), set(needed), {once}

    # -- forward: the input of block i for micro-batch j

    def put_input(self, i: int, j: int, x: torch.Tensor) -> None:
        if (i, j) in self.kept:
            self.ram["x", i, j] = x
            return
        if j < self.flow:
            self.ram["c", j] = x
        if self.spills_input(i, j):
            self._spill(f"x.{i}.{j}", x, "inputs")

    def spills_input(self, i: int, j: int) -> bool:
        """Whether the input of block i for micro-batch j goes to a file: one the backward needs
        again, not kept, or one that cannot flow in RAM to the next block."""
        return (i, j) not in self.kept and (i in self.needed and i not in self.once or j >= self.flow)

    def forward_input(self, i: int, j: int) -> torch.Tensor:
        """For the block's forward; a saved input stays for the backward."""
        if ("x", i, j) in self.ram:
            return self.ram["x", i, j]
        if ("c", j) in self.ram:
            return self.ram.pop(("c", j))
        return self._read(f"x.{i}.{j}", "inputs", keep_file=i in self.needed)

    def prefetch_forward_input(self, i: int, j: int) -> None:
        if ("x", i, j) not in self.ram and ("c", j) not in self.ram:
            self._prefetch(f"x.{i}.{j}", "inputs", keep_file=i in self.needed)

    def input(self, i: int, j: int) -> torch.Tensor:
        """For the backward's recompute: the last use."""
        for key in (("x", i, j), ("c", j)):
            if key in self.ram:
                return self.ram.pop(key)
        return self._read(f"x.{i}.{j}", "inputs")

    def prefetch_input(self, i: int, j: int) -> None:
        if ("x", i, j) not in self.ram and not (i in self.once and ("c", j) in self.ram):
            self._prefetch(f"x.{i}.{j}", "inputs", keep_file=False)

    # -- backward: the gradient flowing into unit i for micro-batch j

    def put_grad(self, i: int, j: int, g: torch.Tensor, journaled: str | None = None) -> Future | None:
        """Keeps or spills the gradient; ``journaled``: the name a journal commit will give it,
        under which a spilled one is written (and left for the journal, not retired once read).
        Returns the spill's write, if any."""
        if j < self.flow:
            self.ram["g", j] = g
            return None
        name = journaled or f"g.{i}.{j}"
        self.grad_names[i, j] = name
        if journaled:
            self.journaled.add(name)
        return self._spill(name, g, "grads")

    def grad(self, i: int, j: int, keep: bool = False) -> torch.Tensor:
        """The gradient, gone from here unless ``keep`` (a journal commit copies it)."""
        if ("g", j) in self.ram:
            return self.ram["g", j] if keep else self.ram.pop(("g", j))
        name = self.grad_names[i, j] if keep else self.grad_names.pop((i, j))
        return self._read(name, "grads", keep_file=keep or name in self.journaled)

    def grad_in_ram(self, j: int) -> bool:
        return j < self.flow

    def prefetch_grad(self, i: int, j: int) -> None:
        if ("g", j) not in self.ram:
            name = self.grad_names[i, j]
            self._prefetch(name, "grads", keep_file=name in self.journaled)

    # -- files

    def _spill(self, name: str, x: torch.Tensor, category: str) -> Future:
        fut = self.files[name] = self.io.submit(self.store.write_scratch, name, x.detach().cpu(), category, write=True)
        return fut

    def _prefetch(self, name: str, category: str, keep_file: bool) -> None:
        if name in self.files and name not in self.reading:
            def read():
                x = self.store.read_scratch(name, category)
                if not keep_file:
                    self.store.retire_scratch(name)  # here, not tidied later: the next step reuses the name
                return x

            self.reading[name] = self.io.submit(read, after=[self.files[name]])

    def _read(self, name: str, category: str, keep_file: bool = False) -> torch.Tensor:
        self._prefetch(name, category, keep_file)
        fut = self.reading.pop(name)
        if not keep_file:
            self.files.pop(name)
        return self.io.wait(fut).result().to(self.device)

    def clear(self) -> None:
        for d in (self.ram, self.files, self.reading, self.grad_names, self.journaled):
            d.clear()
