#!/usr/bin/env python
"""slowft's training step against the same arithmetic in RAM, and against its own I/O.

    python bench/bench_step.py --dim 1024 --layers 16 --batch 4 --seq 256 --ram-budget 0

One run measures, on one random llama2-shaped model (llama2's 32000 vocab), with SGD:
  T_slowft   slowft's step (blocks on SSD, prefetch and write-behind), including its last writes
  T_compute  plain in-RAM PyTorch with per-block activation checkpointing (the same arithmetic, no I/O)
  T_io       the very reads and writes of one slowft step (recorded, then replayed by the store alone)
and reports ratio = T_slowft / T_compute and overlap efficiency = max(T_compute, T_io) / T_slowft,
the time slowft's step was blocked on its I/O, peak RSS of each, bytes moved per step,
import/export MB/s, and on Linux, during each side's steps, the CPU a VM's hypervisor took
(steal: time the cores were not the process's) and the time the cores sat idle. Each side is
its own process (so its peak RSS is its own); the three stay alive and take turns, one step each
per round, so a machine that speeds up or slows down over the run affects them alike; medians
over the rounds. The last line is JSON with every figure. --depth-sweep adds slowft's peak RSS
for 4/8/16/32 layers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VOCAB = 32000


def peak_rss() -> int:
    """This process's peak RSS. On Linux from VmHWM: ru_maxrss of a child started with vfork
    (as subprocess does) starts at its parent's peak, which would hide the child's own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def cpu_times() -> dict[str, float] | None:
    """CPU seconds so far, all cores (Linux's /proc/stat; None elsewhere): ``steal``, taken from
    this VM by the machine's hypervisor, and ``idle``, the cores running nothing (idle + iowait).
    The sides take turns, the others waiting on a pipe, so a step's share of either is its own."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        tick = os.sysconf("SC_CLK_TCK")
        return {"steal": int(fields[8]) / tick, "idle": (int(fields[4]) + int(fields[5])) / tick}
    except (OSError, IndexError, ValueError):
        return None


def batch(a):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (a.batch, a.seq), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def serve(ready: dict, step, finish) -> None:
    """Worker side of the turn-taking: 'step' runs one timed step, 'end' reports and exits."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            step()
            print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
        else:
            print(json.dumps(finish()), flush=True)
            return


# ----------------------------------------------------------------------------- workers (own process each)

def worker_import(a) -> None:
    from slowft.checkpoint import import_model
    from slowft.formats.meta import MetaSource
    from slowft.store import Store

    src = MetaSource.open(a.model)
    store = Store(a.workdir)
    store.reset()
    t0 = time.perf_counter()
    import_model(src, store, torch.float32, progress=False)
    dt = time.perf_counter() - t0
    print(json.dumps({"import_s": dt, "import_MBps": src.total_bytes() / dt / 1e6, "import_peak_rss": peak_rss()}))


TRACED = ("read_unit", "write_unit", "read_scratch", "write_scratch", "write_json", "retire_unit", "retire_scratch")


def trace_store(store, trace: list) -> None:
    """Records the store calls of a step (name, unit/file, shapes) for the io worker to replay."""
    for name in TRACED:
        orig = getattr(store, name)

        def wrapped(*args, orig=orig, name=name):
            if trace[0]:
                desc = [x if isinstance(x, (str, int)) else None for x in args]
                if name == "write_scratch":
                    desc[1] = list(args[1].shape)
                trace[1].append([name, desc])
            return orig(*args)

        setattr(store, name, wrapped)


def worker_slowft(a) -> None:
    import slowft
    from slowft.offloaded import OffloadedModel
    from slowft.store import Store

    store = Store(a.workdir)
    trace = [False, []]
    trace_store(store, trace)
    model = OffloadedModel(store, torch.device(a.device), ram_budget=a.ram_budget, io_depth=a.io_depth, page_cache=a.page_cache)
    tokens, targets = batch(a)
    opt = slowft.SGD(lr=1e-5)
    waits = []  # per step: seconds the compute thread was blocked on the disk

    def step():
        waited = model.io.waited
        model.step(tokens, targets, opt)
        model.io.drain(tidy=False)  # its writes belong to it; deleting old versions runs on, as between steps of a run
        waits.append(model.io.waited - waited)

    step()  # warm-up
    before, trace[0] = store.stats.snapshot(), True
    step()  # fenced on both sides: exact bytes, and the trace the io worker replays
    trace[0] = False
    io = store.stats.delta(store.stats.snapshot(), before)
    ready = {"read_bytes": io["read"], "written_bytes": io["written"], "trace": trace[1], "resident": model.cache.resident,
             "page_cache": not store.direct,
             "unit_bytes": model.unit_bytes, "x_bytes": a.batch * a.seq * model.args.dim * 4}
    serve(ready, step, lambda: {"peak_rss": peak_rss(), "io_wait_s": waits[2:]})  # the timed steps'
    model.close()


def worker_ram(a) -> None:
    from torch.utils.checkpoint import checkpoint

    from slowft.formats.meta import MetaSource, split_dim
    from slowft.model import Transformer, cross_entropy

    src = MetaSource.open(a.model)
    model = Transformer(src.args)
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in src.shards]
    with torch.no_grad():
        for k, p in model.state_dict().items():
            d = split_dim(k)
            p.copy_(shards[0][k] if d is None else torch.cat([s[k] for s in shards], d))
    del shards
    model.to(a.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    tokens, targets = (t.to(a.device) for t in batch(a))

    def step():
        logits = model(tokens, block_fn=lambda b, h, rope: checkpoint(b, h, rope, use_reentrant=False))
        cross_entropy(logits, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device == "cuda":
            torch.cuda.synchronize()

    step()
    serve({}, step, lambda: {"peak_rss": peak_rss()})


def worker_io(a) -> None:
    """Replays a recorded step's store calls, synchronously, with no compute."""
    from slowft.store import Store

    rec = json.loads(Path(a.trace).read_text())
    tidy = ThreadPoolExecutor(max_workers=1)  # deletions run in the background, as slowft's do
    store = Store(a.workdir)
    store.direct = a.page_cache != "on"  # as the slowft worker's store decided
    current = {u: max(v) for u, v in store.unit_versions().items()}
    units = {u: store.read_unit(u, v) for u, v in current.items()}  # the tensors to write back

    def step():
        scratch, superseded = {}, {}
        for name, args in rec["trace"]:
            if name == "read_unit":
                store.read_unit(args[0], current[args[0]])
            elif name == "write_unit":  # a new version, read from now on
                superseded.setdefault(args[0], []).append(current[args[0]])
                current[args[0]] += 1
                store.write_unit(args[0], current[args[0]], units[args[0]])
            elif name == "retire_unit" and superseded.get(args[0]):  # after the commit: the old version goes
                tidy.submit(store.retire_unit, args[0], superseded[args[0]].pop(0), current[args[0]])
            elif name == "write_scratch":
                x = scratch.setdefault(tuple(args[1]), torch.zeros(args[1]))
                store.write_scratch(args[0], x, args[2])
            elif name == "read_scratch":
                store.read_scratch(args[0], args[1])
            elif name == "retire_scratch":
                store.retire_scratch(args[0])
            elif name == "write_json":
                store.write_json("journal-bench.json", {"versions": current})
        for unit, versions in superseded.items():  # deletions the recorded step left to the next
            for v in versions:
                tidy.submit(store.retire_unit, unit, v, current[unit])

    serve({}, step, dict)


def worker_export(a) -> None:
    import slowft

    with slowft.load(a.model, workdir=a.workdir, device="cpu", ram_budget=0, progress=False) as model:
        t0 = time.perf_counter()
        out = model.save_llama2(Path(a.workdir).parent / "export", progress=False)
        dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.glob("consolidated.*.pth"))
    print(json.dumps({"export_s": dt, "export_MBps": size / dt / 1e6}))


WORKERS = {"import": worker_import, "slowft": worker_slowft, "ram": worker_ram, "io": worker_io, "export": worker_export}


# ----------------------------------------------------------------------------- orchestration

def start_worker(kind: str, a, **extra) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--worker", kind, "--model", str(a.model), "--workdir", str(a.workdir),
            "--batch", str(a.batch), "--seq", str(a.seq), "--device", a.device,
            "--ram-budget", str(a.ram_budget), "--io-depth", str(a.io_depth), "--page-cache", a.page_cache]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def reply(proc: subprocess.Popen, kind: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"{kind} worker failed (exit {proc.wait()})")
    return json.loads(line)


def run_once(kind: str, a, **extra) -> dict:
    proc = start_worker(kind, a, **extra)
    out = reply(proc, kind)
    proc.wait()
    return out


def make_model(dim: int, layers: int, heads: int, cache: Path) -> Path:
    from slowft.tiny import make_tiny

    path = cache / f"llama-d{dim}-l{layers}-h{heads}"
    if not (path / "params.json").exists():
        print(f"making a random model {path.name} ...", file=sys.stderr)
        make_tiny(path, dim=dim, layers=layers, heads=heads, shards=1, multiple_of=256, params_vocab=VOCAB)
    return path


def mb(n) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="rounds: timed steps of each side, after warm-up")
    ap.add_argument("--ram-budget", type=float, default=0, help="bytes for resident blocks/inputs (0: all via disk)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--io-depth", type=int, default=1, help="blocks read ahead / writes pending")
    ap.add_argument("--page-cache", choices=["auto", "on", "off"], default="auto",
                    help="stream through the OS page cache (auto: where it holds the model, as here; off: as for a model larger than RAM)")
    ap.add_argument("--depth-sweep", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slowft-bench")
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--trace", type=Path)
    a = ap.parse_args()
    a.ram_budget = int(a.ram_budget)
    if a.worker:
        WORKERS[a.worker](a)
        return

    a.cache.mkdir(parents=True, exist_ok=True)
    a.model = make_model(a.dim, a.layers, a.heads, a.cache)
    a.workdir = a.cache / "work" / a.model.name
    io_dir = a.cache / "work" / f"{a.model.name}-io-replay"
    r = {"machine": f"{os.cpu_count()} cpu, {os.uname().machine}, torch {torch.__version__}",
         "model": {"dim": a.dim, "layers": a.layers, "heads": a.heads, "vocab": VOCAB},
         "batch": a.batch, "seq": a.seq, "ram_budget": a.ram_budget, "io_depth": a.io_depth, "device": a.device,
         "page_cache_flag": a.page_cache}
    r.update(run_once("import", a))
    run_once("import", argparse.Namespace(**{**vars(a), "workdir": io_dir}))
    r.update(run_once("export", a))

    workers = {"slowft": start_worker("slowft", a)}
    r.update(reply(workers["slowft"], "slowft"))
    trace_file = a.cache / "trace.json"
    trace_file.write_text(json.dumps({"trace": r.pop("trace")}))
    io_args = argparse.Namespace(**{**vars(a), "workdir": io_dir, "page_cache": "on" if r["page_cache"] else "off"})
    workers["io"] = start_worker("io", io_args, trace=trace_file)
    workers["ram"] = start_worker("ram", a)
    for kind in ("io", "ram"):
        reply(workers[kind], kind)
    times: dict[str, list[float]] = {k: [] for k in workers}
    steal: dict[str, list[float]] = {k: [] for k in workers}
    idle: dict[str, list[float]] = {k: [] for k in workers}
    order = list(workers)
    for i in range(a.steps):  # take turns, rotating who goes first
        for kind in order[i % 3:] + order[: i % 3]:
            before = cpu_times()
            workers[kind].stdin.write("step\n")
            workers[kind].stdin.flush()
            times[kind].append(reply(workers[kind], kind)["s"])
            if before is not None:
                after = cpu_times()
                steal[kind].append(after["steal"] - before["steal"])
                idle[kind].append(after["idle"] - before["idle"])
    for kind, proc in workers.items():
        proc.stdin.write("end\n")
        proc.stdin.flush()
        end = reply(proc, kind)
        r[f"{kind}_peak_rss"] = end.get("peak_rss")
        if kind == "slowft":
            r["slowft_io_wait_s"] = end["io_wait_s"]
        proc.wait()

    units = r["unit_bytes"]
    block = max(v for k, v in units.items() if k.startswith("layers."))
    model_bytes = sum(units.values())
    x_bytes = r["x_bytes"]
    ts, tc, ti = (statistics.median(times[k]) for k in ("slowft", "ram", "io"))
    read, written = sum(r["read_bytes"].values()), sum(r["written_bytes"].values())
    r.update({
        "slowft_step_s": ts, "compute_step_s": tc, "io_step_s": ti, "steps_s": times, "cpu_steal_s": steal, "cpu_idle_s": idle,
        "ratio": ts / tc, "overlap_efficiency": max(tc, ti) / ts,
        "block_bytes": block, "model_bytes": model_bytes, "saved_inputs_bytes": x_bytes * a.layers,
        "read_per_model": read / model_bytes,
        "written_per_trainable_plus_inputs": written / (model_bytes + x_bytes * a.layers),
        "rss_target": 2.5 * block + x_bytes * a.layers + 0.5e9,
    })
    if a.depth_sweep:
        sweep = {}
        for n in (4, 8, 16, 32):
            b = argparse.Namespace(**{**vars(a)})
            b.model = make_model(a.dim, n, a.heads, a.cache)
            b.workdir = a.cache / "work" / b.model.name
            run_once("import", b)
            proc = start_worker("slowft", b)
            reply(proc, "slowft")
            proc.stdin.write("end\n")
            proc.stdin.flush()
            sweep[n] = reply(proc, "slowft")["peak_rss"]
            proc.wait()
        r["depth_sweep_peak_rss"] = sweep
        r["rss_32_over_8"] = sweep[32] / sweep[8]

    print(f"\nslowft bench: {r['machine']}; dim {a.dim}, {a.layers} layers, {a.heads} heads, vocab {VOCAB}; "
          f"batch {a.batch} x {a.seq}; SGD; ram budget {mb(a.ram_budget)}; io depth {a.io_depth}; device {a.device}; "
          f"page cache {'on' if r['page_cache'] else 'off'} (--page-cache {a.page_cache})")
    print(f"  block {mb(block)}, model {mb(model_bytes)} (fp32), saved inputs {mb(x_bytes * a.layers)}; "
          f"median of {a.steps} interleaved rounds")
    print(f"  T_slowft   {ts:8.2f} s/step   peak RSS {mb(r['slowft_peak_rss'])}  "
          f"(target 2.5 blocks + inputs + 0.5 GB = {mb(r['rss_target'])})")
    print(f"  of which waiting for the disk {statistics.median(r['slowft_io_wait_s']):.2f} s/step (median; what overlap did not hide)")
    print(f"  T_compute  {tc:8.2f} s/step   peak RSS {mb(r['ram_peak_rss'])}  (in RAM, per-block checkpointing)")
    print(f"  T_io       {ti:8.2f} s/step   (the step's reads and writes, store alone)")
    if all(steal.values()):
        label = {"slowft": "slowft", "ram": "in RAM", "io": "I/O alone"}
        print("  CPU taken by the hypervisor (steal) per step, median: " + ", ".join(
            f"{label[k]} {statistics.median(v):.2f} s" for k, v in steal.items()))
        print(f"  cores idle per step (out of {os.cpu_count()} cores x the step), median: " + ", ".join(
            f"{label[k]} {statistics.median(v):.2f} s" for k, v in idle.items()))
    print(f"  ratio T_slowft/T_compute {r['ratio']:.3f}; overlap efficiency max(T_compute, T_io)/T_slowft {r['overlap_efficiency']:.3f}")
    print(f"  per step: read {mb(read)} ({r['read_per_model']:.2f} x model), wrote {mb(written)} "
          f"({r['written_per_trainable_plus_inputs']:.3f} x (model + inputs)); by kind: read {r['read_bytes']}, wrote {r['written_bytes']}")
    print(f"  import {r['import_MBps']:.0f} MB/s (peak RSS {mb(r['import_peak_rss'])}), export {r['export_MBps']:.0f} MB/s")
    if a.depth_sweep:
        print("  depth sweep peak RSS: " + ", ".join(f"{n} layers {mb(v)}" for n, v in r["depth_sweep_peak_rss"].items())
              + f"; 32/8 = {r['rss_32_over_8']:.3f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
