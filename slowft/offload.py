"""Hiding the SSD: units and saved inputs come in ahead of use and go out behind it.

Two background threads do the disk I/O: one reads, one writes, so a read that the next block
needs never waits behind the write of another. Order is explicit where it matters: a read of a
unit (or saved input) waits for that file's pending write, and a journal commit runs on the
writer thread after the writes it names, so it only ever names durable files. While block i
computes, block i+1 is written back and block i-1 read in; a bounded number of writes may be
pending, so RAM holds about three blocks beyond the resident set.

What stays resident is decided by the known future: a pass's schedule of units is given up
front and, when room is needed, the unit whose next use is farthest away is dropped (Belady).
This keeps the last blocks of the forward for the start of the backward and the first blocks of
the backward for the next forward.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .store import Store


class IOWorker:
    """The disk threads (a reader and a writer). After a task fails, every later task fails too."""

    def __init__(self, delay: float = 0.0, synchronous: bool = False):
        self._pools = None if synchronous else {
            False: ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowft-read"),
            True: ThreadPoolExecutor(max_workers=1, thread_name_prefix="slowft-write"),
        }
        self._failed: BaseException | None = None
        self._pending: collections.deque[Future] = collections.deque()
        self._writes: collections.deque[Future] = collections.deque()
        self.delay = delay  # artificial latency before each write (tests: stale reads must not happen)

    def submit(self, fn, *args, write: bool = False, after: Future | None = None) -> Future:
        """Queues ``fn(*args)`` on the reader or writer thread, once ``after`` (a write) is done.
        Synchronous mode runs it now: the reference the overlapped path is checked against."""
        def run():
            if after is not None:
                after.exception()
            if self._failed is not None:  # the original error (e.g. ENOSPC), for whoever waits on this
                raise self._failed
            if write and self.delay:
                threading.Event().wait(self.delay)
            try:
                return fn(*args)
            except BaseException as e:
                self._failed = e
                raise

        if self._pools is None:
            fut = Future()
            try:
                fut.set_result(run())
            except BaseException as e:
                fut.set_exception(e)
            return fut
        for queue in (self._pending, self._writes):
            while queue and queue[0].done():
                queue.popleft()
        fut = self._pools[write].submit(run)
        self._pending.append(fut)
        if write:
            self._writes.append(fut)
        return fut

    def throttle(self, max_writes: int) -> None:
        """Waits until at most ``max_writes`` writes are pending: bounds the RAM write-behind holds."""
        while len(self._writes) > max_writes:
            self._writes.popleft().exception()
        self.check()

    def check(self) -> None:
        """Raises the first failure of any task so far."""
        if self._failed is not None:
            raise self._failed

    def drain(self) -> None:
        """Waits for every queued task; raises the first failure."""
        while self._pending:
            self._pending.popleft().exception()
        self._writes.clear()
        self.check()

    def shutdown(self) -> None:
        for pool in (self._pools or {}).values():
            pool.shutdown(wait=True)


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return tensors
    return {k: v.to(device, non_blocking=device.type == "cuda") for k, v in tensors.items()}


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


@dataclass
class _Entry:
    tensors: dict | None = None  # on the compute device, storage dtype
    reading: Future | None = None  # pending read -> cpu tensors
    dirty: bool = False  # updated in memory, not yet written (resident mode)
    pins: int = 0


class UnitCache:
    """Units on the device: loaded ahead along a schedule, written behind, kept while they fit."""

    def __init__(self, store: Store, io: IOWorker, device: torch.device, versions: dict[str, int],
                 unit_bytes: dict[str, int], budget: int, depth: int = 1):
        self.store, self.io, self.device = store, io, device
        self.versions = dict(versions)  # in memory
        self.durable = dict(versions)  # named by the journal
        self.unit_bytes = unit_bytes
        self.depth = max(0, depth)
        self.set_budget(budget)
        self.entries: dict[str, _Entry] = {}
        self.writing: dict[str, Future] = {}  # the latest write of each unit
        self.schedule: list[str] = []
        self.pos = 0
        self._uncommitted: list[Future] = []

    def set_budget(self, budget: int) -> None:
        """Everything fits: keep it all and write only at commits. Otherwise stream, writing each
        update through, since a crash must never find units newer than the journal says."""
        self.resident = budget >= sum(self.unit_bytes.values())
        blocks = [n for u, n in self.unit_bytes.items() if u.startswith("layers.")] or list(self.unit_bytes.values())
        # room to stream blocks; a larger unit (a llama-vocab embedding or head) is loaded anyway
        # when needed, evicting the rest
        self.capacity = budget + (self.depth + 1) * max(blocks)

    # -- schedule

    def plan(self, schedule: list[str]) -> None:
        """The order of the coming get() calls; assumed to repeat after its end."""
        self.schedule, self.pos = list(schedule), 0

    def _next_use(self, unit: str) -> int:
        n = len(self.schedule)
        for d in range(1, n + 1):
            if self.schedule[(self.pos + d) % n] == unit:
                return d
        return n + 1

    def _used_bytes(self) -> int:
        return sum(self.unit_bytes[u] for u in self.entries)

    def _make_room(self, need: int, keep: set[str]) -> bool:
        while self._used_bytes() + need > self.capacity:
            victims = [u for u, e in self.entries.items()
                       if e.pins == 0 and e.reading is None and not e.dirty and u not in keep]
            if not victims:
                return False
            del self.entries[max(victims, key=self._next_use)]  # a pending write keeps its own reference
        return True

    def _start_read(self, unit: str) -> _Entry:
        after = self.writing.get(unit)  # a unit is never read before its pending write is done
        entry = _Entry(reading=self.io.submit(self.store.read_unit, unit, self.versions[unit], after=after))
        self.entries[unit] = entry
        return entry

    def _prefetch(self) -> None:
        if not self.schedule:
            return
        upcoming = [self.schedule[(self.pos + d) % len(self.schedule)] for d in range(1, self.depth + 1)]
        for unit in upcoming:
            if unit in self.entries:
                continue
            if not self._make_room(self.unit_bytes[unit], keep=set(upcoming) | {self.schedule[self.pos]}):
                return
            self._start_read(unit)

    # -- access

    def get(self, unit: str, for_update: bool = False) -> dict[str, torch.Tensor]:
        """The unit's tensors on the device (storage dtype). Pinned until release()."""
        if self.schedule:
            n = len(self.schedule)
            for d in range(n):
                if self.schedule[(self.pos + d) % n] == unit:
                    self.pos = (self.pos + d) % n
                    break
        entry = self.entries.get(unit)
        if entry is None:
            self._make_room(self.unit_bytes[unit], keep={unit})
            entry = self._start_read(unit)
        entry.pins += 1
        self._prefetch()
        if entry.reading is not None:
            cpu = entry.reading.result()
            entry.tensors, entry.reading = to_device(cpu, self.device), None
        if for_update and unit in self.writing:
            self.writing.pop(unit).result()  # never update tensors the writer is still copying out
        self.io.check()
        return entry.tensors

    def release(self, unit: str, updated: bool = False) -> None:
        entry = self.entries[unit]
        entry.pins -= 1
        if not updated:
            return
        self.versions[unit] += 1
        if self.resident:
            entry.dirty = True
        else:
            self.io.throttle(self.depth + 1)
            self._write(unit, entry.tensors)

    def _write(self, unit: str, tensors: dict[str, torch.Tensor]) -> None:
        fut = self.io.submit(self.store.write_unit, unit, self.versions[unit], to_cpu(tensors), write=True)
        self.writing[unit] = fut
        self._uncommitted.append(fut)

    def drop(self, unit: str) -> None:
        """Forgets an in-memory copy that must not be used (e.g. after a non-finite update)."""
        self.entries.pop(unit, None)

    # -- durability

    def commit(self, journal: dict, grad: tuple[str, torch.Tensor] | None = None, old_grad: str | None = None) -> Future:
        """Writes dirty units and ``grad``, then ``journal`` naming the new versions, then deletes
        what it superseded. All on the I/O thread, in order; returns the commit's future."""
        for unit, entry in self.entries.items():
            if entry.dirty:
                self._write(unit, entry.tensors)
                entry.dirty = False
        deps = list(self._uncommitted)
        self._uncommitted.clear()
        if grad is not None:
            deps.append(self.io.submit(self.store.write_scratch, grad[0], grad[1].detach().cpu(), "grads", write=True))
        versions = dict(self.versions)
        superseded = {u: v for u, v in self.durable.items() if v != versions[u]}
        self.durable = versions

        def finish():
            for d in deps:
                d.result()
            self.store.write_journal({**journal, "versions": versions})
            for u, v in superseded.items():
                self.store.delete_unit(u, v)
            if old_grad:
                self.store.delete_scratch(old_grad)

        return self.io.submit(finish, write=True)

    @property
    def dirty(self) -> bool:
        return any(e.dirty for e in self.entries.values())


class SavedInputs:
    """Each block's input from the forward, for its recompute in the backward.

    The last ones are needed first, so those stay in memory while they fit the budget; earlier
    ones spill to scratch files and are read back one block ahead of the backward.
    """

    def __init__(self, store: Store, io: IOWorker, device: torch.device, budget: int):
        self.store, self.io, self.device, self.budget = store, io, device, budget
        self.kept: dict[int, torch.Tensor] = {}
        self.spilled: dict[int, Future] = {}
        self.reading: dict[int, Future] = {}
        self.first_kept = 0

    def start(self, n_blocks: int, x_bytes: int) -> None:
        self.clear()
        fit = self.budget // max(1, x_bytes)
        self.first_kept = max(0, n_blocks - fit)

    def save(self, i: int, x: torch.Tensor) -> None:
        if i >= self.first_kept:
            self.kept[i] = x
        else:
            self.spilled[i] = self.io.submit(self.store.write_scratch, f"input.{i}", x.detach().cpu(), "inputs", write=True)

    def prefetch(self, i: int) -> None:
        if i in self.spilled and i not in self.reading:
            def read():
                x = self.store.read_scratch(f"input.{i}", "inputs")
                self.store.delete_scratch(f"input.{i}")
                return x

            self.reading[i] = self.io.submit(read, after=self.spilled[i])

    def load(self, i: int) -> torch.Tensor:
        if i in self.kept:
            return self.kept.pop(i)
        self.prefetch(i)
        self.spilled.pop(i)
        return self.reading.pop(i).result().to(self.device)

    def clear(self) -> None:
        self.kept.clear()
        self.spilled.clear()
        self.reading.clear()
