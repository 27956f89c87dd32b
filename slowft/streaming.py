"""Hiding the SSD: units and saved inputs come in ahead of use and go out behind it.

Background threads do the disk I/O, one reading and one writing. Order is explicit where it
matters: a read of a unit (or saved input) waits for that file's pending write, and a journal
commit runs on the writer thread after the writes it names, so it only ever names durable files.
While block i computes, block i+1 is written back and then block i-1 is read into the buffer
that write frees: a unit read waits for the unit writes pending before it. An SSD gives reads and
writes one bandwidth, so overlapping them would gain little and cost a block of memory; so at
--io-depth 1, beyond the resident set, memory holds the unit computing and one other.

What stays resident is decided by the known future: a pass's schedule of units is given up
front and, when room is needed, the unit whose next use is farthest away is dropped (Belady).
This keeps the last blocks of the forward for the start of the backward and the first blocks of
the backward for the next forward.
"""
from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .directio import aligned_region, round_up
from .heap import release_pages
from .store import Store, pack
from .units import is_layer


class IOWorker:
    """The disk threads: a reader, a writer, and a third that retires superseded files (kept as
    spares, or deleted: on a filesystem mounted with ``discard`` an unlink waits for the SSD to
    trim, ~30 ms per block, which must not hold up a read or write). After a task fails, every
    later task fails too; a failed retirement is no failure (a file left over is collected when
    the work dir is opened)."""

    def __init__(self, delay: float = 0.0, synchronous: bool = False):
        self._pools = None if synchronous else {
            lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slowft-{lane}") for lane in ("read", "write", "tidy")
        }
        self._failed: BaseException | None = None
        self._writes: collections.deque[Future] = collections.deque()
        self._tidies: collections.deque[Future] = collections.deque()
        self._tidy_lock = threading.Lock()  # deletions are queued from the writer thread too
        # a finished read's future holds a whole unit: only its owner keeps it alive
        self._reads: weakref.WeakSet[Future] = weakref.WeakSet()
        self.delay = delay  # artificial latency before each write (tests: stale reads must not happen)
        self.waited = 0.0  # seconds the compute thread spent blocked on the disk: what overlap did not hide

    def _run(self, lane: str, task) -> Future:
        if self._pools is None:  # synchronous mode runs it now: the reference the overlapped path is checked against
            fut = Future()
            try:
                fut.set_result(task())
            except BaseException as e:
                fut.set_exception(e)
            return fut
        return self._pools[lane].submit(task)

    def submit(self, fn, *args, write: bool = False, after: Sequence[Future] = ()) -> Future:
        """Queues ``fn(*args)`` on the reader or writer thread, once the futures ``after`` are done."""
        def run():
            for fut in after:
                fut.exception()
            if self._failed is not None:  # the original error (e.g. ENOSPC), for whoever waits on this
                raise self._failed
            if write and self.delay:
                threading.Event().wait(self.delay)
            try:
                return fn(*args)
            except BaseException as e:
                self._failed = e
                raise

        fut = self._run("write" if write else "read", run)
        if write:
            while self._writes and self._writes[0].done():
                self._writes.popleft()
            self._writes.append(fut)
        else:
            self._reads.add(fut)
        return fut

    def tidy(self, fn, *args) -> None:
        """Queues a deletion on the third thread; called only once nothing can need the file."""
        def run():
            try:
                fn(*args)
            except OSError:
                pass

        with self._tidy_lock:
            while self._tidies and self._tidies[0].done():
                self._tidies.popleft()
            self._tidies.append(self._run("tidy", run))

    def wait(self, fut: Future) -> Future:
        """Blocks until ``fut`` is done, counting the time in ``waited``; returns it."""
        if not fut.done():
            t0 = time.perf_counter()
            try:
                fut.exception()
            finally:
                self.waited += time.perf_counter() - t0
        return fut

    def check(self) -> None:
        """Raises the first failure of any task so far."""
        if self._failed is not None:
            raise self._failed

    def drain(self, tidy: bool = True) -> None:
        """Waits for every queued read and write (and, unless ``tidy`` is False, deletion); raises
        the first failure."""
        for fut in list(self._reads):
            self.wait(fut)
        while self._writes:
            self.wait(self._writes.popleft())
        while tidy:
            with self._tidy_lock:
                if not self._tidies:
                    break
                fut = self._tidies.popleft()
            self.wait(fut).result()
        self.check()

    def shutdown(self) -> None:
        for pool in (self._pools or {}).values():
            pool.shutdown(wait=True)


class BufferPool:
    """Aligned host buffers that units were read into, handed back once nothing uses them, so
    steady-state streaming reuses memory instead of asking the allocator for a unit per read
    (fresh memory is page-faulted in, on the reader's time); on a GPU it also gives a write's
    device-to-host copy a ready buffer. Holds at most ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor | None:
        """The smallest free buffer that holds ``nbytes`` (rounded up to whole pages), if any; the
        pages past them go back to the system (faulted in again if the buffer holds more later)."""
        with self._lock:
            fits = [b for b in self._free if b.numel() >= round_up(nbytes)]
            if not fits:  # those free are smaller (blocks, as the head is read): they go back to the OS
                self._free.clear()
                self.bytes = 0
                return None
            buf = min(fits, key=torch.Tensor.numel)
            self._free.remove(buf)
            self.bytes -= buf.numel()
        release_pages(buf[round_up(nbytes):])  # a block's buffer lent to the head: 0.3 GB at dim 4096
        return buf

    def give(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keeps the buffer under a unit's tensors while the pool has room (only a unit read or
        packed here lives in one buffer; others are left to the allocator)."""
        storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
        if len(storages) != 1 or any(t.device.type != "cpu" for t in tensors.values()):
            return
        buf = aligned_region(next(iter(tensors.values())).untyped_storage())
        with self._lock:
            if self.bytes + buf.numel() <= self.max_bytes:
                self._free.append(buf)
                self.bytes += buf.numel()


class _Write:
    """A unit's write in flight, and the buffers to hand back to the pool once it is done (its
    unit's, if evicted meanwhile; a GPU's packed host copy). The write hands them back itself,
    before its future completes, so a read waiting for it finds them in the pool."""

    def __init__(self, pool: BufferPool, tensors: dict):
        self.pool, self.fut, self.tensors = pool, None, tensors  # tensors: what to write, until taken
        self._held: list[dict] | None = []
        self._lock = threading.Lock()

    def hold(self, tensors: dict) -> None:
        """Gives ``tensors`` to the pool once the write is done (at once, if it is)."""
        with self._lock:
            if self._held is not None:
                self._held.append(tensors)
                return
        self.pool.give(tensors)

    def done(self) -> None:
        """Called by the write itself, done or failed."""
        with self._lock:
            held, self._held = self._held, None
        for tensors in held:
            self.pool.give(tensors)


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
        self.writing: dict[str, _Write] = {}  # the latest write of each unit
        self.pool = BufferPool(max_bytes=round_up(self.max_block))
        self.schedule: list[str] = []
        self.pos = 0
        self._uncommitted: list[Future] = []
        self._unit_writes: collections.deque[_Write] = collections.deque()
        self.write_journal = store.write_journal  # (ranks: their two-phase commit, slowft.distributed)

    def set_budget(self, budget: int) -> None:
        """Everything fits: keep it all and write only at commits. Otherwise stream, writing each
        update through, since a crash must never find units newer than the journal says."""
        self.resident = budget >= sum(self.unit_bytes.values())
        blocks = [n for u, n in self.unit_bytes.items() if is_layer(u)] or list(self.unit_bytes.values())
        self.max_block = max(blocks)
        self.budget = budget  # for units kept beyond those in use and those read ahead

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

    def _ahead(self) -> list[str]:
        """The next ``depth`` units of the schedule besides the current one: those to read ahead.
        (A unit in use further on, like the top block, held from its forward through the head's
        backward to its own, takes the place of one to read: it holds as much memory.)"""
        ahead: list[str] = []
        n = len(self.schedule)
        for d in range(1, n):
            unit = self.schedule[(self.pos + d) % n]
            if unit == self.schedule[self.pos] or unit in ahead:
                continue
            if len(ahead) == self.depth:
                break
            ahead.append(unit)
        return ahead

    def _make_room(self, keep: set[str]) -> None:
        """Evicts, furthest next use first, until the units kept beside ``keep`` (those in use and
        those read ahead) fit the budget: with no budget, a unit leaves as soon as it is done."""
        while True:
            others = [u for u in self.entries if u not in keep]
            if sum(self.unit_bytes[u] for u in others) <= self.budget:
                return
            victims = [u for u in others if self.entries[u].pins == 0 and self.entries[u].reading is None
                       and not self.entries[u].dirty]
            if not victims:
                return
            self._evict(max(victims, key=self._next_use))

    def _evict(self, unit: str) -> None:
        """Drops a unit from memory; its buffer is reused once its pending write (if any) is done."""
        tensors = self.entries.pop(unit).tensors
        pending = self.writing.get(unit)
        if pending is not None:
            pending.hold(tensors)
        else:
            self.pool.give(tensors)

    def _start_read(self, unit: str) -> _Entry:
        """Reads once the unit writes now pending are done (the unit's own among them, if any: only
        done writes leave ``_unit_writes``): a unit is never read stale, and the read fills the
        buffer a write freed."""
        after = [w.fut for w in self._unit_writes if not w.fut.done()]
        entry = _Entry(reading=self.io.submit(self.store.read_unit, unit, self.versions[unit], self.pool.take, after=after))
        self.entries[unit] = entry
        return entry

    def _prefetch(self) -> None:
        if not self.schedule:
            return
        ahead = self._ahead()
        self._make_room({self.schedule[self.pos], *ahead})
        for unit in ahead:
            if unit not in self.entries:
                self._start_read(unit)

    # -- access

    def _seek(self, unit: str) -> None:
        """Moves along the schedule to ``unit``'s next use."""
        n = len(self.schedule)
        for d in range(n):
            if self.schedule[(self.pos + d) % n] == unit:
                self.pos = (self.pos + d) % n
                return

    def advance(self, unit: str) -> None:
        """Marks the use of a unit already in hand (got long before): reads ahead from there."""
        self._seek(unit)
        self._prefetch()

    def get(self, unit: str, for_update: bool = False) -> dict[str, torch.Tensor]:
        """The unit's tensors on the device (storage dtype). Pinned until release()."""
        self._seek(unit)
        entry = self.entries.get(unit)
        if entry is None:
            self._make_room({unit})
            entry = self._start_read(unit)
        entry.pins += 1
        self._prefetch()
        if entry.reading is not None:
            cpu = self.io.wait(entry.reading).result()
            if self.device.type == "cpu":
                entry.tensors = cpu
            else:  # a synchronous copy: the host buffer is free again at once
                entry.tensors = {k: v.to(self.device) for k, v in cpu.items()}
                self.pool.give(cpu)
            entry.reading = None
        if for_update and unit in self.writing:
            self.io.wait(self.writing.pop(unit).fut).result()  # never update tensors the writer is still copying out
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
            self._throttle()
            self._write(unit, entry.tensors)

    def _throttle(self) -> None:
        """Waits for room to queue a unit's write: at most ``depth`` are ever pending, which
        bounds the units write-behind holds in memory (journal commits are small, not counted)."""
        while len(self._unit_writes) >= max(1, self.depth):
            self.io.wait(self._unit_writes.popleft().fut)
        self.io.check()

    def _write(self, unit: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.device.type == "cpu":
            host = tensors
        else:  # copy out, packed as the file wants it, into a recycled host buffer handed back once written
            host = pack(tensors, take=self.pool.take)
        self.writing[unit] = written = _Write(self.pool, host)
        if self.device.type != "cpu":
            written.hold(host)
        written.fut = self.io.submit(self._write_unit, unit, self.versions[unit], written, write=True)
        self._uncommitted.append(written.fut)
        self._unit_writes.append(written)

    def _write_unit(self, unit: str, version: int, written: _Write) -> int:
        """Runs on the writer thread. The buffers go back before the write counts as done, and the
        tensors are not among its arguments: those live on until after its future completes."""
        tensors, written.tensors = written.tensors, None
        try:
            n = self.unit_bytes[unit] = self.store.write_unit(unit, version, tensors)
            if is_layer(unit):  # a file grows once, as the optimizer adds its state: the pool follows
                self.pool.max_bytes = max(self.pool.max_bytes, round_up(n))
            return n
        finally:
            del tensors
            written.done()

    def drop(self, unit: str) -> None:
        """Forgets an in-memory copy that must not be used (e.g. after a non-finite update)."""
        self.entries.pop(unit, None)

    # -- durability

    def commit(self, journal: dict, grads=(), old_grads=()) -> Future:
        """Writes dirty units and ``grads`` ((name, the tensor, a function giving it, or the
        Future of its write under that name already queued[, the bytes' category]); then ``journal`` naming the
        new versions, then deletes what it superseded; the last three on the writer thread,
        after the unit writes they name."""
        for unit, entry in self.entries.items():
            if entry.dirty:
                self._throttle()
                self._write(unit, entry.tensors)
                entry.dirty = False
        deps = list(self._uncommitted)
        self._uncommitted.clear()
        last = None
        for name, grad, *category in grads:
            if isinstance(grad, Future):  # already being written under this name
                deps.append(grad)
                continue
            if callable(grad) and last is not None:  # read back: one at a time in memory
                self.io.wait(last)
            g = grad() if callable(grad) else grad
            last = self.io.submit(self.store.write_scratch, name, g.detach().cpu(), category[0] if category else "grads", write=True)
            deps.append(last)
            del g
        versions = dict(self.versions)
        superseded = {u: v for u, v in self.durable.items() if v != versions[u]}
        self.durable = versions

        def finish():
            for d in deps:
                d.result()
            self.write_journal({**journal, "versions": versions})
            for u, v in superseded.items():  # only now that the journal no longer names them
                self.io.tidy(self.store.retire_unit, u, v, versions[u])
            for name in old_grads:
                self.io.tidy(self.store.retire_scratch, name)

        return self.io.submit(finish, write=True)

    @property
    def dirty(self) -> bool:
        return any(e.dirty for e in self.entries.values())
