"""The model whose units live in the work directory: ``slowft.load`` and what it returns.

Only the unit in use (plus what prefetch and the RAM budget allow) is on the device. One
weightless ``TransformerBlock`` holds the code; each block's tensors are passed in per call.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import train, units
from .errors import SlowftError
from .checkpoint import DTYPE_NAMES, check_export_dir, dtype_of, import_model, meta_key, n_params
from .formats import open_source, writer
from .activations import Activations
from .lora import DEFAULT_TARGETS, TARGETS, Adapters, write_peft
from .optim import AdamW
from .model import Head, KVCache, ModelArgs, TransformerBlock, packed_mask, packed_rope, precompute_rope
from .plan import Layout, split_budget
from .progress import progress as progress_of
from .rounding import generator_for, stochastic
from .store import FORMAT, Store
from .streaming import IOWorker, UnitCache

DEVICES = ("auto", "mps", "cuda", "cpu")
ROUNDINGS = ("stochastic", "nearest")  # how an update is stored in a bf16 work dir


def cache_root() -> Path:
    return Path(os.environ.get("SLOWFT_CACHE", "~/.cache/slowft")).expanduser()


def pick_device(name: str | None = None) -> torch.device:
    """mps > cuda > cpu for 'auto'; an unavailable device is a user error, not a fallback."""
    name = name or "auto"
    mps = torch.backends.mps.is_available()
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("mps" if mps else "cuda" if cuda else "cpu")
    have = ["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else [])
    if name.split(":")[0] not in DEVICES[1:]:
        raise SlowftError(f"--device {name}: unknown device; expected one of {', '.join(['auto'] + have)}")
    if name.split(":")[0] not in have:
        raise SlowftError(f"--device {name}: not available on this machine; expected one of {', '.join(['auto'] + have)}")
    return torch.device(name)


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        (a @ a).sum().item()
    except (RuntimeError, TypeError):
        raise SlowftError(f"--compute-dtype {dtype}: not supported on {device}; expected float32") from None


def default_ram_budget(device: torch.device) -> int:
    """Half of what is free now: resident units and saved inputs live in it."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    return int(psutil.virtual_memory().available * 0.5)


def workdir_path(src, workdir, storage_dtype: str) -> Path:
    """``--workdir`` as given, else the cache's folder for this source and storage dtype."""
    return Path(workdir).expanduser() if workdir else cache_root() / f"{src.path.name}-{src.fingerprint()}-{storage_dtype}"


def _inside(a: Path, b: Path) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def check_export_path(out_dir: Path, source: Path, workdir: Path) -> None:
    """An export replaces its folder whole: it must neither lie in nor hold the source model or
    the work dir, and must not replace anything but an earlier export."""
    for what, path in (("the source model folder", source), ("the work dir", workdir)):
        if _inside(out_dir, path):
            raise SlowftError(f"--out {out_dir}: is inside {what} {path}; expected a folder elsewhere")
        if _inside(path, out_dir):
            raise SlowftError(f"--out {out_dir}: holds {what} {path}; expected a folder elsewhere")
    check_export_dir(out_dir)


def open_workdir(src, workdir, storage_dtype: str, reset: bool = False) -> Store:
    """Opens (creating) the work dir for ``src``; refuses one that belongs to another model or dtype."""
    if storage_dtype not in ("float32", "bfloat16"):
        raise SlowftError(f"--storage-dtype {storage_dtype}: expected float32 or bfloat16")
    root = workdir_path(src, workdir, storage_dtype)
    if _inside(root, src.path):
        raise SlowftError(f"--workdir {root}: is inside the source model folder {src.path}; expected a folder elsewhere")
    store = Store(root)
    meta = store.read_json("meta.json")
    if meta is not None and reset:
        store.reset()
        meta = None
    if meta is not None and (
        meta.get("format") != FORMAT
        or meta["source"]["fingerprint"] != src.fingerprint()
        or meta["storage_dtype"] != storage_dtype
    ):
        store.close()
        raise SlowftError(
            f"{store.root}: work dir belongs to {meta['source']['path']} ({meta['storage_dtype']}), "
            f"not {src.path} ({storage_dtype}); pass --reset-workdir to start it over, or another --workdir"
        )
    return store


def load(path, workdir=None, device=None, storage_dtype: str = "float32", compute_dtype: str = "float32",
         ram_budget: int | None = None, reset_workdir: bool = False, progress: bool = True,
         rounding: str = "stochastic", ranks=None) -> "OffloadedModel":
    """Opens a model folder (Meta's format or Hugging Face's, slowft.formats); imports it into the
    work dir on first use, reuses it after.
    ``storage_dtype`` "auto": that of an import of this source already there (``workdir``, or
    the cache's), else the source's own where the store keeps it (bf16 for Meta's: exact, and
    half the disk of float32, e.g. to only generate text).
    ``ranks`` (slowft.Ranks.from_env, under torchrun): this process is one rank of several, on
    ``ranks.device``, with a ``workdir`` of its own; ``step`` then takes the whole batch and
    computes this rank's share of it, the ranks' work dirs first brought to one state."""
    src = open_source(path)
    dev = ranks.device if ranks is not None else pick_device(device)
    if storage_dtype == "auto":
        native = "bfloat16" if src.dtype == torch.bfloat16 else "float32"
        found = [Store.storage_dtype_of(workdir_path(src, workdir, d)) for d in (native, "float32", "bfloat16")]
        storage_dtype = next((f[1] for f in found if f and f[0] == src.fingerprint()), native)
    store = open_workdir(src, workdir, storage_dtype, reset_workdir)
    try:
        meta = store.read_json("meta.json") or {}
        if progress and not meta.get("imported"):
            size = n_params(src.args) * DTYPE_NAMES[storage_dtype].itemsize
            print(f"slowft: importing {src.path} into {store.root} ({size / 1e6:,.0f} MB, {storage_dtype}); "
                  "reused from then on", file=sys.stderr)
        run = meta.get("run")
        if run and not run.get("finished"):
            raise SlowftError(
                f"{store.root}: holds an unfinished training run; finish it with finetune.py --resume, "
                "or pass another --workdir"
            )
        if run:
            print(f"slowft: {store.root} holds fine-tuned weights; re-importing the originals from {src.path}")
            store.reset()
        import_model(src, store, DTYPE_NAMES[storage_dtype], progress=progress)
        if ranks is not None:
            ranks.agree_on_journal(store)
        return OffloadedModel(store, dev, compute_dtype, ram_budget, rounding=rounding, ranks=ranks)
    except BaseException:
        store.close()
        raise


def use_page_cache(streamed: int, spare: int) -> bool:
    """Whether what streams through the work dir each step should go through the OS page cache:
    only where the cache can hold all of it, with room to spare, between its write and its next
    read. A model larger than memory would only be copied once more by the CPU and push out memory
    in use, and is better read and written straight from the SSD."""
    return 0 < streamed <= spare // 2


class OffloadedModel:
    def __init__(self, store: Store, device: torch.device, compute_dtype: str = "float32",
                 ram_budget: int | None = None, io_depth: int = 1, io: IOWorker | None = None,
                 page_cache: str = "auto", rounding: str = "stochastic", ranks=None):
        """``ranks`` (slowft.distributed.Ranks): data-parallel, this process one rank of several,
        each with its own work dir; each step's batch is split between them."""
        self.store, self.device = store, device
        if rounding not in ROUNDINGS:
            raise SlowftError(f"--rounding {rounding}: expected one of {', '.join(ROUNDINGS)}")
        if page_cache not in ("auto", "on", "off"):
            raise ValueError(f"page_cache {page_cache!r}: expected auto, on or off")
        self.page_cache = page_cache
        if compute_dtype not in DTYPE_NAMES:
            raise SlowftError(f"--compute-dtype {compute_dtype}: expected one of {', '.join(DTYPE_NAMES)}")
        self.compute_dtype = DTYPE_NAMES[compute_dtype]
        if self.compute_dtype != torch.float32:
            check_dtype(device, self.compute_dtype)
        self.meta = store.read_json("meta.json")
        self.args = ModelArgs(**self.meta["args"])
        journal = store.read_journal()
        if "next" in journal and ranks is None:
            raise SlowftError(f"{store.root / 'journal.json'}: a rank's work dir from a run on several ranks, stopped mid-commit; "
                              "resume it with the same torchrun command")
        self.ranks = ranks
        self.fingerprint_every = 0  # with ranks: every so many steps, check that their weights are still the same
        self.step_count: int = journal["step"]
        self.sweep: dict | None = journal.get("sweep")
        versions = journal["versions"]
        updated = set(self.backward_order()[: self.sweep["done"]] if self.sweep else [])
        if any(versions[u] > self.step_count + (u in updated) for u in self.forward_order()):  # (frozen units lag)
            raise SlowftError(f"{store.root / 'journal.json'}: unit versions disagree with step {self.step_count}; pass --reset-workdir")
        # the gradients the journal names: one file per micro-batch ("grad": one, before micro-batches)
        self.grad_files: list[str] = (self.sweep.get("grads") or [self.sweep["grad"]]) if self.sweep else []
        self.lora: Adapters | None = None  # enable_lora
        self.lora_file: str | None = journal.get("lora")  # the adapters the journal names, in scratch
        store.collect_garbage(versions, set(self.grad_files) | ({self.lora_file} if self.lora_file else set()))
        self.unit_bytes = {u: store.unit_bytes(u, v) for u, v in versions.items()}
        self.ram_budget = default_ram_budget(device) if ram_budget is None else int(ram_budget)
        self.io = io or IOWorker()
        self.cache = UnitCache(store, self.io, device, versions, self.unit_bytes, self.ram_budget, io_depth)
        if ranks is not None:
            self.cache.write_journal = ranks.journal_writer(store)
        self.activations = Activations(store, self.io, device, 0)
        self.rounding = rounding
        self.on_progress = None  # (phase, unit k of n, micro-batch j of K) -> None, e.g. a progress line
        with torch.device("meta"):  # code only: each call passes a unit's tensors
            self._block = TransformerBlock(self.args)
            self._head = Head(self.args)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stop_requested = False  # set from a signal handler; honoured between units
        self.broken: str | None = None  # why memory no longer matches any state of the work dir
        self.sync_every_s = train.SYNC_EVERY_S
        self.last_sync = time.monotonic()

    # -- layout

    @property
    def layer_units(self) -> list[str]:
        return units.layers(self.args.n_layers)

    def forward_order(self) -> list[str]:
        return units.forward_order(self.args.n_layers)

    def backward_order(self) -> list[str]:
        return units.backward_order(self.args.n_layers)

    def n_params(self) -> int:
        return n_params(self.args)

    def configure_memory(self, x_bytes: int, n_micro: int = 1) -> None:
        """Splits the RAM budget: all units if they fit (no unit I/O at all), then activations
        (``x_bytes`` per block and micro-batch); and decides whether what streams goes through the
        page cache (``use_page_cache``)."""
        total = sum(self.unit_bytes.values())
        inputs = x_bytes * self.args.n_layers * n_micro
        unit_budget, input_budget = split_budget(self.ram_budget, total, inputs)
        self.cache.set_budget(unit_budget)
        self.activations.budget = input_budget
        if self.page_cache == "auto":
            streamed = 0 if self.cache.resident else total - unit_budget + max(0, inputs - input_budget)
            spare = psutil.virtual_memory().available - (self.ram_budget if self.device.type != "cuda" else 0)
            self.store.direct = not use_page_cache(streamed, spare)
        else:
            self.store.direct = self.page_cache == "off"

    def layout(self) -> Layout:
        """What a projection of the writes needs (slowft.plan): the units' files as they are now."""
        state = {u: self.store.state_bytes(u, v) for u, v in self.cache.versions.items()}
        return Layout(self.args, dict(self.unit_bytes), state, self.compute_dtype, self.ram_budget)

    def rope(self, T: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < start + T:
            n = max(start + T, 256)
            self._rope = precompute_rope(self.args.head_dim, n, self.args.rope_theta, self.device, self.args.rope_scaling)
        cos, sin = self._rope
        return cos[start:start + T], sin[start:start + T]

    # -- compute on one unit

    def weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.compute_dtype) for k, v in units.weights_of(tensors).items()}

    def embed(self, tokens, drop=None):
        """The embedding's rows for ``tokens``, gathered before the conversion to the compute dtype
        (which, done to the whole [vocab, dim] matrix, would copy all of it)."""
        w = self.cache.get(units.EMBEDDING)
        try:
            h = F.embedding(tokens, w["weight"]).to(self.compute_dtype)
        finally:
            self.cache.release(units.EMBEDDING)
        return h if drop is None else drop(h, "out")

    def block_fn(self, w, x, rope, start_pos=0, kv=None, drop=None, split=False, mask=None):
        return functional_call(self._block, w, (x, rope), {"start_pos": start_pos, "cache": kv, "drop": drop, "split": split,
                                                           "mask": mask})

    def adapted_block_fn(self, i: int):
        """block_fn for block i, with its LoRA paths where adapters are on (adapted)."""
        def fn(w, *args, **kwargs):
            with self.adapted(i, w):
                return self.block_fn(w, *args, **kwargs)

        return fn

    def head_fn(self, w, h):
        return functional_call(self._head, w, (h,))

    def norm_fn(self, weight, h):
        """The head's final RMSNorm alone (training computes the output projection by hand)."""
        return functional_call(self._head.norm, {"weight": weight}, (h,))

    def run_unit(self, unit: str, fn, *args, **kwargs):
        w = self.cache.get(unit)
        try:
            return fn(self.weights(w), *args, **kwargs)
        finally:
            self.cache.release(unit)

    # -- inference

    @torch.no_grad()
    def forward_cached(self, tokens: torch.Tensor, start_pos: int = 0, kv: list[KVCache] | None = None,
                       segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32, on the device); with ``kv`` it extends those caches. Rows
        packed with examples (``segments`` [B, T], as training takes them) attend within each
        example, its positions restarting with it."""
        self.usable()
        tokens = tokens.to(self.device)
        self.cache.plan(self.forward_order() + ([units.EMBEDDING, units.HEAD] if self.args.tie_embeddings else []))
        rope, mask = self.rope(tokens.shape[1], start_pos), None
        if segments is not None:
            segments = segments.to(self.device)
            rope, mask = packed_rope(rope, segments), packed_mask(segments)
        h = self.embed(tokens)
        for i in range(self.args.n_layers):
            h = self.run_unit(units.layer(i), self.adapted_block_fn(i), h, rope, start_pos, kv[i] if kv else None, mask=mask)
        return self.head_logits(h)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        if not self.args.tie_embeddings:
            return self.run_unit(units.HEAD, self.head_fn, h)
        tied = self.cache.get(units.EMBEDDING)  # the output projection is the embedding
        try:
            out = {"output.weight": tied["weight"].to(self.compute_dtype)}
            return self.run_unit(units.HEAD, lambda w, x: self.head_fn({**w, **out}, x), h)
        finally:
            self.cache.release(units.EMBEDDING)

    def logits(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V], float32 on the cpu; one unit on the device at a time."""
        return self.forward_cached(tokens, segments=segments).cpu()

    def new_kv_cache(self, batch: int, max_len: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, max_len, a.kv_heads, a.head_dim, self.device, self.compute_dtype) for _ in range(a.n_layers)]

    # -- training

    def usable(self) -> None:
        """Refuses to go on from memory that a step left half-updated (the work dir is intact:
        reopened, it resumes from its last durable state)."""
        if self.broken:
            raise SlowftError(f"{self.store.root}: {self.broken}; open it again (slowft.load) to go on from its last durable state")

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, optimizer, dropout: float = 0.0, seed: int = 0,
             micro_batch_size: int | None = None, train_layers=None, train_embedding: bool = True,
             train_head: bool = True, segments: torch.Tensor | None = None) -> float:
        """One fused forward, backward and update; returns the loss (the mean over the targets
        that are >= 0). ``tokens`` and ``targets`` [N, T] run as N / ``micro_batch_size``
        micro-batches (None: one) through each unit, read and written once. ``train_layers``
        (block indices; None: all), ``train_embedding`` and ``train_head`` choose what is
        updated: the rest is read, never written. ``segments`` [N, T]: rows packed with several
        examples, an id each: attention stays within an example, positions restart with it."""
        self.usable()
        if self.lora_file is not None and self.lora is None:
            raise SlowftError(f"{self.store.root}: holds a LoRA run's adapters; enable_lora() with its settings to go on, "
                              "or pass --reset-workdir")
        if self.lora is not None:
            if not isinstance(optimizer, AdamW):
                raise SlowftError("LoRA trains its adapters with AdamW; expected slowft.AdamW (--optimizer adamw)")
            self.lora.use_optimizer(optimizer.lr, optimizer.betas, optimizer.eps, optimizer.weight_decay)
        return train.train_step(self, tokens, targets, optimizer, dropout=dropout, seed=seed,
                                micro_batch_size=micro_batch_size, train_layers=train_layers,
                                train_embedding=train_embedding, train_head=train_head, segments=segments)

    # -- LoRA

    def enable_lora(self, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, dropout: float = 0.0,
                    seed: int = 0) -> Adapters:
        """From now on ``step`` trains low-rank adapters of the blocks' ``targets`` (slowft.lora)
        with AdamW in RAM (the optimizer step() is given sets its lr, betas, eps and weight decay),
        and never writes a unit; logits and exports include them. Adapters the work dir's journal
        names are taken up again (a resumed LoRA run), with the same settings only."""
        self.usable()
        try:
            adapters = Adapters(self.args, rank, alpha, targets, dropout, seed, self.device)
        except ValueError as e:
            raise SlowftError(f"LoRA: {e}") from None
        adapters.use_optimizer(lr=0.0)
        if self.lora_file is None and self.step_count > 0:
            raise SlowftError(f"{self.store.root}: holds a full fine-tune at step {self.step_count}; LoRA trains adapters on "
                              "the source's weights: pass --reset-workdir or another --workdir")
        if self.lora_file is not None:
            if self.meta.get("lora") != adapters.config():
                raise SlowftError(f"{self.store.root}: holds LoRA adapters made with {self.meta.get('lora')}, not "
                                  f"{adapters.config()}; resume with those settings, or pass --reset-workdir")
            adapters.load_flat(self.store.read_scratch(self.lora_file, "lora"))
        elif self.meta.get("lora") != adapters.config():
            self.meta["lora"] = adapters.config()
            self.store.write_json("meta.json", self.meta)
        self.lora = adapters
        return adapters

    def adapted(self, i: int, weights: dict, drop=None):
        """A context in which block i, run on ``weights``, takes its LoRA paths (if any)."""
        return self.lora.applied(i, weights, drop) if self.lora is not None else contextlib.nullcontext()

    def save_adapters(self, out_dir) -> Path:
        """The adapters alone, in PEFT's layout for the Hugging Face form of this model."""
        if self.lora is None:
            raise SlowftError("save_adapters: no LoRA adapters; expected enable_lora() first")
        out_dir = Path(out_dir).expanduser().resolve()
        check_export_path(out_dir, Path(self.meta["source"]["path"]), self.store.root)
        write_peft(out_dir, self.lora, self.args, self.meta["source"]["path"])
        return out_dir

    def writer(self, seed: int, step: int, unit: str):
        """name -> how the optimizer stores tensor ``name`` of ``unit`` (a weight, or a state
        tensor ``optim.<weight>.<key>``): with stochastic rounding, a bf16 one is rounded with
        noise keyed by (seed, step, unit, tensor), so a resumed run rounds as the original did;
        otherwise to nearest (None: fp32 weights keep their in-place arithmetic)."""
        if self.rounding != "stochastic":
            return lambda name: None
        bf16 = self.meta["storage_dtype"] == "bfloat16"
        return lambda name: stochastic(generator_for(seed, step, unit, name, self.device)) if bf16 or units.is_state(name) else None

    def progress(self, phase: str, k: int, n: int, j: int, n_micro: int) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, k, n, j, n_micro)

    def commit(self, sweep: dict | None = None, grads=()) -> None:
        """Queues a journal commit of the current state: at a step boundary (``sweep`` None) or
        part-way through the step's backward, with the gradients flowing into the next unit
        (``grads``: (file name, tensor or a function giving it), one per micro-batch)."""
        names = sweep["grads"] if sweep else []
        old = [n for n in self.grad_files if n not in names]
        journal = {"step": self.step_count, "sweep": sweep}
        if self.lora is not None and sweep is None and self.lora_file != self.lora_name():
            grads = [*grads, (self.lora_name(), self.lora.flat(), "lora")]  # written before the journal that names it
            old += [self.lora_file] if self.lora_file else []
            self.lora_file = self.lora_name()
        if self.lora_file:
            journal["lora"] = self.lora_file
        self.cache.commit(journal, grads=grads, old_grads=old)
        self.grad_files, self.sweep = names, sweep

    def lora_name(self) -> str:
        return f"lora.s{self.step_count:06d}"

    def should_stop(self) -> bool:
        """Whether to stop now (a Ctrl-C or SIGTERM): with ranks, if any rank was asked to, all stop."""
        return self.ranks.any(self.stop_requested) if self.ranks is not None else self.stop_requested

    def sync(self) -> None:
        """Makes the work dir hold the current weights (in resident mode they live in RAM between syncs).
        Ranks commit together, so with ranks it always commits."""
        self.usable()
        if self.ranks is not None or self.cache.dirty or (self.lora is not None and self.lora_file != self.lora_name()):
            self.commit()
        self.io.drain()
        self.last_sync = time.monotonic()

    # -- export

    def units(self):
        """(unit, tensors on the cpu) in the source's file order: the current weights, resident or not."""
        self.usable()
        order = self.meta["source"]["unit_order"]
        self.cache.plan(order)
        for unit in order:
            tensors = self.cache.get(unit)
            try:  # copies: the cache recycles its buffers once a unit leaves it
                out = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
            finally:
                self.cache.release(unit)
            if self.lora is not None and units.is_layer(unit):  # merged: W + (alpha/rank) B A, in fp32
                for t in self.lora.targets:
                    name = TARGETS[t]
                    out[name] = out[name].float() + self.lora.delta(units.layer_index(unit), t).cpu()
            yield unit, out

    def named_tensors(self):
        """(Meta key, tensor) for every trained tensor, e.g. to compare against a reference."""
        for unit, tensors in self.units():
            for name, t in tensors.items():
                if not units.is_state(name):
                    yield meta_key(unit, name), t

    def save(self, out_dir, format: str | None = None, dtype=None, shards: int | None = None,
             max_shard_size: int | None = None, progress: bool = True) -> Path:
        """Writes the current weights as a checkpoint in ``format`` ("meta" or "hf"; by default the
        source's), in ``dtype`` (a torch.dtype or its name; by default the source's). ``shards``:
        Meta's file count (by default the source's); ``max_shard_size``: bytes per Hugging Face file."""
        self.usable()
        src = self.meta["source"]
        write = writer(format or src.get("format", "meta"), "format")
        out_dtype = dtype_of(dtype or src["dtype"])
        out_dir = Path(out_dir).expanduser().resolve()
        check_export_path(out_dir, Path(src["path"]), self.store.root)
        need = self.n_params() * out_dtype.itemsize
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = psutil.disk_usage(str(out_dir.parent)).free
        if need > free:
            raise SlowftError(f"{out_dir}: export needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free there")
        with progress_of(sum(self.unit_bytes.values()), "export", enabled=progress, leave=False) as bar:
            write(out_dir, self.units(), self.args, self.store.read_extras(), self.store.root, src, out_dtype,
                  shards=shards, max_shard_size=max_shard_size, progress=lambda unit, n: bar.update(n))
        return out_dir

    def save_llama2(self, out_dir, shards: int | None = None, dtype=None, progress: bool = True) -> Path:
        """Writes the current weights in Meta's format (by default the source's shard count and dtype)."""
        return self.save(out_dir, "meta", dtype, shards, progress=progress)

    def close(self) -> None:
        try:
            self.io.drain()
        finally:
            self.io.shutdown()
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

