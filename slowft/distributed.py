"""Data-parallel training over torch.distributed: one slowft per rank, started by torchrun.

Every rank keeps the whole model in a work dir of its own and takes its share of each step's
micro-batches. Before a unit's fused update its gradient is summed over the ranks (all-reduce),
so every rank applies the same update and the weights stay identical without ever being sent.
gloo carries CPU tensors (an Apple GPU's gradients are copied to the CPU and back for it);
where every rank computes on cuda, nccl sums them in place.

Crash safety across ranks: each rank journals its own work dir, and every commit is two-phase.
A rank first writes its journal with the new state as ``next`` (the files it names durable),
then waits until every rank has, and only then makes ``next`` its state. A crash can thus leave
a rank one commit behind the others, never more, and never without that commit prepared: at
the start of a run the ranks compare their journals and roll forward to the furthest
(``Ranks.agree_on_journal``). Commits happen at the same points on every rank: the decisions
that lead to one (a stop, a sync, how often to commit) are taken together (``any``, ``least``).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import RankLost, RanksDiverged, SlowftError

DEFAULT_TIMEOUT_S = 1800.0  # a rank waits this long for the others (rank 0 alone evaluates a prompt, exports)


def position(journal: dict | None) -> tuple[int, int] | None:
    """How far a journal's state is: (step, units of that step's backward done)."""
    if journal is None:
        return None
    return journal["step"], (journal.get("sweep") or {}).get("done", 0)


def fingerprint(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A cheap digest of a unit's weights, the same on any device: ~``samples`` values of each
    tensor, evenly strided, as exact fp32 bytes (two ranks' weights diverge everywhere at once)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // samples)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def folder_digest(folder, pages: int = 8, page: int = 4096) -> str:
    """A digest of a model folder's files (weights, configuration, tokenizer) by name, size and
    ``pages`` sampled pages each: two copies of one checkpoint give the same on any machine,
    whatever their paths and file times; two checkpoints of one shape (a base and its chat
    version) do not."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in (".pth", ".safetensors", ".json", ".model")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for k in range(pages):
                f.seek(size * k // pages)
                h.update(f.read(page))
    return h.hexdigest()[:16]


def world_size() -> int:
    """How many ranks torchrun started (its WORLD_SIZE; 1: a single process)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 0 else 1


class Ranks:
    """This process's place among the ranks of a torchrun launch, and the collectives slowft uses.
    A collective that fails (a rank died, or did not answer within ``timeout_s``) raises
    RankLost, after which every later one does at once."""

    def __init__(self, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.timeout_s, self.device = timeout_s, device
        self.lost: str | None = None
        self.reduced_bytes, self.reduce_s = 0, 0.0  # gradient bytes this rank has all-reduced, and the seconds it took
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise RankLost(f"rank {self.rank}: could not join the other ranks at {where} ({_first_line(e)})") from None
        devices = self.gather(device.type)
        self.nccl = dist.new_group(backend="nccl") if all(d == "cuda" for d in devices) else None
        nonce = self.gather(uuid.uuid4().hex if self.rank == 0 else None)[0]  # keys of this launch only
        self.store = dist.PrefixStore(f"slowft/{nonce}/", dist.distributed_c10d._get_default_store())
        self.commits = 0

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Ranks | None":
        """The ranks torchrun started (its RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or None
        for a single process."""
        world = world_size()
        if world == 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise SlowftError(f"WORLD_SIZE={world} without {', '.join(missing)}: expected torchrun to start each rank")
        if device.type == "cuda" and device.index is None:  # one GPU per rank on a machine
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return cls(device, timeout_s)

    @property
    def first(self) -> bool:
        """Rank 0: it prints, logs and exports."""
        return self.rank == 0

    def _call(self, fn, *args, **kwargs):
        if self.lost:
            raise RankLost(self.lost)
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # (DistBackendError and gloo's errors are RuntimeErrors)
            self.lost = f"rank {self.rank}: lost the other ranks ({_first_line(e)})"
            raise RankLost(self.lost) from None

    # -- collectives

    def reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the ranks, in place; returns it. gloo takes CPU tensors only: others are
        copied there and back (mps's among them), unless every rank has cuda (nccl)."""
        self.reduced_bytes += t.numel() * t.element_size()
        t0 = time.perf_counter()
        try:
            if self.nccl is not None or (t.device.type == "cpu" and t.is_contiguous()):
                self._call(dist.all_reduce, t, group=self.nccl)
                return t
            host = t.to("cpu", copy=True).contiguous()
            self._call(dist.all_reduce, host)
            return t.copy_(host)
        finally:
            self.reduce_s += time.perf_counter() - t0

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` summed over the ranks (e.g. each rank's share of the loss)."""
        return self.reduce_(x.detach().clone())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank: a decision every rank takes together."""
        t = torch.tensor([int(bool(flag))])
        self._call(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def least(self, n: int) -> int:
        t = torch.tensor([int(n)])
        self._call(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather(self, obj) -> list:
        """``obj`` (picklable) of every rank, in rank order."""
        out = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        self._call(dist.barrier)

    def check_same(self, settings: dict, what: str = "settings") -> None:
        """Refuses ranks given different ``settings`` (a SlowftError naming the first difference)."""
        everyone = self.gather(settings)
        for r, theirs in enumerate(everyone):
            for k in settings:
                if theirs.get(k) != everyone[0].get(k):
                    raise SlowftError(f"{k}: rank {r} was given {theirs.get(k)}, rank 0 {everyone[0].get(k)}; "
                                      f"expected the same {what} on every rank")

    def check_fingerprints(self, digest: str, step: int) -> None:
        everyone = self.gather(digest)
        if len(set(everyone)) > 1:
            odd = next(r for r, d in enumerate(everyone) if d != everyone[0])
            raise RanksDiverged(f"after step {step} rank {odd}'s weights differ from rank 0's; the ranks no longer train "
                                "one model (a rank's disk or memory corrupted them, or ranks run different code)")

    # -- the journal, two-phase

    def all_prepared(self, key: str) -> None:
        """Waits until every rank has called this with ``key``. Thread-safe (it talks to the
        launch's TCPStore, not the process group): the writer thread calls it mid-commit while
        the compute thread runs collectives."""
        n = self._call(self.store.add, key, 1)
        deadline = time.monotonic() + self.timeout_s
        while n < self.world:
            if self.lost:
                raise RankLost(self.lost)
            if time.monotonic() > deadline:
                self.lost = f"rank {self.rank}: the other ranks did not commit within {self.timeout_s:.0f} s"
                raise RankLost(self.lost)
            time.sleep(0.005)
            n = self._call(self.store.add, key, 0)

    def journal_writer(self, store):
        """The two-phase ``write_journal`` a rank's UnitCache commits through (see the module's
        docstring). Commits happen at the same points on every rank, one at a time (on the
        writer thread), so their count keys them."""
        committed = [store.read_journal()]

        def write(journal: dict) -> None:
            self.commits += 1
            store.write_journal({**committed[0], "next": journal})
            self.all_prepared(f"commit/{self.commits}")
            store.write_journal(journal)
            committed[0] = journal

        return write

    def agree_on_journal(self, store) -> None:
        """Brings every rank's work dir to the furthest state any rank committed: a rank behind has
        that state prepared (``next``) and rolls forward to it; a prepared state no rank committed
        is dropped (its files are collected when the work dir is opened)."""
        journal = store.read_journal()
        mine = position(journal), position(journal.get("next"))
        everyone = self.gather(mine)
        target = max(p for p, _ in everyone)
        if any(target not in theirs for theirs in everyone):  # (every rank sees it: all of them stop)
            states = ", ".join(f"rank {r} at step {p[0]} ({p[1]} units done)" for r, (p, _) in enumerate(everyone))
            raise SlowftError(f"{store.root}: the ranks' work dirs hold different runs ({states}); "
                              "pass --reset-workdir to every rank to start over")
        resolved = {k: v for k, v in journal.items() if k != "next"} if mine[0] == target else journal["next"]
        if resolved != journal:
            store.write_journal(resolved)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    """An error's gist: its first sentence, without gloo's source location."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:300]
