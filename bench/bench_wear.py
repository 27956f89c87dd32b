#!/usr/bin/env python
"""SSD wear per trained token against micro-batches per step and storage dtype, and what the
bf16 storage costs in quality.

    python bench/bench_wear.py                       # the grid below and the quality runs (~17 min on 2 busy cores)
    python bench/bench_wear.py --no-quality          # the grid alone
    python bench/bench_wear.py --no-grid             # the quality runs alone (~2-3 min)
    python bench/bench_wear.py --ks 1 4 --storages fp32 --trained all --no-quality   # a smaller grid
    python bench/bench_wear.py --dim 64 --layers 2 --heads 4 --seq 16 --steps 1 --ks 1 4 --quality-steps 3  # smoke test

Wear grid. One random llama2-shaped model (default dim 1024, 16 layers, 16 heads, llama2's 32000
vocab: ~1.1 GB in fp32; bench_step.py's ``make_model``, shared with it through ``--cache``),
streamed with ``--ram-budget 0`` (every unit through the work dir every step), SGD. One
configuration per combination of
  K          micro-batches per step (``--ks``, default 1 4 16), each ``--batch`` x ``--seq``
             tokens; every unit is read and written once a step whatever K is
  storage    ``fp32``, or ``bf16-sr`` (bfloat16 work dir, stochastic rounding) (``--storages``)
  trained    ``all`` units, or ``top`` (the upper half of the blocks and the head; the
             embedding and the lower blocks frozen: read, never written) (``--trained``)
For each: work-dir bytes written per trained token during the timed steps, bytes written per
step by category (the store's own counters, after the write-behind has drained) beside
slowft.plan's projection for that step (``projected_writes(model.layout(), ...)``, computed
before it), tokens/s (median of the timed steps; a step is timed until its writes are done),
and the peak RSS of its process. Each configuration is its own process (its own work dir, its
own peak RSS; all of them use the page cache, or all bypass it: decided once for the grid).
They all stay alive and, after one warm-up step each, take turns one step each per round
(``--steps`` rounds, rotating who goes first), so this VM's 20-30 % drift between minutes falls
on all of them alike. Goals: (a) K=16 bf16-sr all-layers writes >= 20x fewer bytes per trained
token than K=1 fp32 all-layers; (b) its tokens/s >= K=1 fp32's (with a smaller ``--ks``: its
largest K against its smallest).

Quality (``--no-quality`` skips it). The demo's model (finetune.py's DEMO shape: dim 128, 4
layers, 4 heads, 2 kv heads, a 512-token tokenizer; make_tiny, a bf16 Meta checkpoint, so every
storage starts from the same weights) trained on ``test_data/`` by the same steps (60 steps of 8 x
64 tokens, seed 0, ``--ram-budget 0``) with storage fp32, bf16 with stochastic rounding and bf16
rounded to nearest, with Adalite (which moves each tensor by lr of its norm a step): at the
demo's lr (finetune.py's DEMO_LR, 3 warm-up steps, cosine to a fifth of it) and at the small lr
real fine-tunes use (finetune.py's DEFAULT_LR: 0.1 % of a tensor's norm a step, under half a
bf16 spacing for most of its elements, so rounding to nearest loses most updates). The last 10 %
of the token stream is held out of training; the loss is the mean cross-entropy over it, every
held-out token scored once (windows of ``--quality-seq`` tokens, half a window apart, so each
token after the first window has at least half a window of context), with ``model.logits``
before, every ``--quality-eval-every`` steps (for the best) and after training; the same on the
training part. Goal: bf16-sr's held-out loss after training within 1 % of fp32's. Beside it, at
the demo lr, two noise floors: bf16-sr with other rounding noise (step()'s seed + 1, the same
batches), and fp32 with each batch as 2 micro-batches (the same arithmetic, summed in another
order). The corpus is small (753 tokens with the default tokenizer), so the held-out part is ~75
tokens, and 60 steps of 512 tokens at the demo lr may overfit the rest (a held-out loss that ends
above its best): then the final held-out figures compare diverging trajectories, and the small
lr, the best held-out loss and the noise floors say how much of a gap is the storage's.

The last stdout line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from bench_step import VOCAB, make_model, mb, peak_rss, reply, serve  # noqa: E402

STORAGES = {"fp32": ("float32", "nearest"), "bf16-sr": ("bfloat16", "stochastic")}
TRAINED = ("all", "top")
QUALITY_STORAGES = {"fp32": ("float32", "nearest"), "bf16-sr": ("bfloat16", "stochastic"),
                    "bf16-nearest": ("bfloat16", "nearest")}
CATEGORIES = ("weights", "optim", "inputs", "grads", "journal")


def name_of(k: int, storage: str, trained: str) -> str:
    return f"K{k}-{storage}-{trained}"


def subset(trained: str, n_layers: int) -> dict:
    """step()'s and plan_step()'s arguments for what a configuration trains."""
    if trained == "all":
        return {"train_layers": None, "train_embedding": True}
    return {"train_layers": list(range(n_layers // 2, n_layers)), "train_embedding": False}


# ----------------------------------------------------------------------------- grid worker (own process each)

def worker_grid(a) -> None:
    import slowft
    from slowft.offloaded import OffloadedModel
    from slowft.plan import plan_step, projected_writes
    from slowft.store import Store

    c = json.loads(a.config)
    store = Store(Path(c["workdir"]))
    model = OffloadedModel(store, torch.device(a.device), ram_budget=a.ram_budget, page_cache=a.page_cache,
                           rounding=STORAGES[c["storage"]][1])
    rows = c["k"] * a.batch
    g = torch.Generator().manual_seed(0)  # the same batch for every configuration of a K, and every step
    tokens = torch.randint(0, VOCAB, (rows, a.seq), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    opt = slowft.SGD(lr=a.lr)
    which = subset(c["trained"], model.args.n_layers)
    plan = plan_step(model.args.n_layers, rows, a.batch, **which)
    records = []

    def step() -> dict:
        projected = projected_writes(model.layout(), opt, plan, a.seq)  # before the step: its files as they are
        before = store.stats.snapshot()
        t0 = time.perf_counter()
        loss = model.step(tokens, targets, opt, micro_batch_size=a.batch, **which)
        model.io.drain(tidy=False)  # its writes belong to it; deleting old versions runs on, as between steps of a run
        dt = time.perf_counter() - t0
        io = store.stats.delta(store.stats.snapshot(), before)
        rec = {"s": dt, "loss": loss, "written": io["written"], "read": io["read"], "projected": projected}
        records.append(rec)
        return rec

    print(json.dumps({"loaded": True}), flush=True)
    sys.stdin.readline()  # the warm-up step waits for its turn: one configuration computes at a time
    warm = step()
    ready = {"warmup_s": warm["s"], "page_cache": not store.direct, "model_bytes": sum(model.unit_bytes.values()),
             "unit_bytes": model.unit_bytes, "n_micro": plan.n_micro, "stop": plan.stop,
             "trained_units": sorted(plan.trained)}
    serve(ready, step, lambda: {"peak_rss": peak_rss(), "steps": records[1:]})  # the timed steps'
    model.close()


# ----------------------------------------------------------------------------- the grid

def start_worker(a, config: dict, page_cache: str) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--worker", "grid", "--config", json.dumps(config),
            "--batch", str(a.batch), "--seq", str(a.seq), "--ram-budget", str(a.ram_budget), "--lr", str(a.lr),
            "--device", a.device, "--page-cache", page_cache]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def run_grid(a, r: dict) -> dict:
    import slowft
    from slowft.offloaded import use_page_cache

    import psutil

    model_dir = make_model(a.dim, a.layers, a.heads, a.cache)
    work = a.cache / "wear-work" / model_dir.name
    configs = {}
    for k in a.ks:
        for storage in a.storages:
            for trained in a.trained:
                configs[name_of(k, storage, trained)] = {"k": k, "storage": storage, "trained": trained,
                                                         "workdir": str(work / name_of(k, storage, trained))}
    streamed = 0
    t0 = time.perf_counter()
    for name, c in configs.items():  # each its own fresh import: no configuration trains on another's weights
        print(f"importing {name} ...", file=sys.stderr, flush=True)
        with slowft.load(model_dir, workdir=c["workdir"], device="cpu", storage_dtype=STORAGES[c["storage"]][0],
                         ram_budget=0, progress=False, reset_workdir=True) as m:
            c["model_bytes"] = sum(m.unit_bytes.values())
            streamed += c["model_bytes"] + a.batch * a.seq * m.args.dim * 4 * m.args.n_layers * c["k"]
    r["import_s"] = time.perf_counter() - t0
    page_cache = a.page_cache
    if page_cache == "auto":  # one decision for all, by slowft's own rule, for all of them at once
        page_cache = "on" if use_page_cache(streamed, psutil.virtual_memory().available) else "off"
    r["page_cache"], r["streamed_bytes_all_configs"] = page_cache, streamed

    print(f"starting {len(configs)} workers (one warm-up step each) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    procs = {name: start_worker(a, c, page_cache) for name, c in configs.items()}  # they start up side by side
    for name, p in procs.items():
        reply(p, name)
    ready = {}
    for name, p in procs.items():  # and warm up in turn: no two compute at once
        send(p, "warm")
        ready[name] = reply(p, name)
    r["warmup_wall_s"] = time.perf_counter() - t0
    times = {name: [] for name in procs}
    order = list(procs)
    t0 = time.perf_counter()
    for i in range(a.steps):  # take turns, rotating who goes first
        for name in order[i % len(order):] + order[: i % len(order)]:
            send(procs[name], "step")
            times[name].append(reply(procs[name], name)["s"])
        print(f"round {i + 1}/{a.steps} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    r["timed_wall_s"] = time.perf_counter() - t0
    out = {}
    for name, p in procs.items():
        send(p, "end")
        end = reply(p, name)
        if p.wait():
            sys.exit(f"{name} worker failed (exit {p.returncode})")
        c, steps = configs[name], end["steps"]
        tokens_per_step = c["k"] * a.batch * a.seq
        written = [sum(s["written"].values()) for s in steps]
        projected = [sum(s["projected"].values()) for s in steps]
        mean = lambda key: {cat: statistics.fmean(s[key][cat] for s in steps) for cat in CATEGORIES}  # noqa: E731
        out[name] = {
            "k": c["k"], "storage": c["storage"], "storage_dtype": STORAGES[c["storage"]][0],
            "rounding": STORAGES[c["storage"]][1] if c["storage"] != "fp32" else None,
            "trained": c["trained"], "trained_units": ready[name]["trained_units"],
            "tokens_per_step": tokens_per_step, "model_bytes": ready[name]["model_bytes"],
            "page_cache": ready[name]["page_cache"], "warmup_s": ready[name]["warmup_s"],
            "steps_s": times[name], "worker_steps_s": [s["s"] for s in steps],
            "tokens_per_s": tokens_per_step / statistics.median(times[name]),
            "losses": [s["loss"] for s in steps],
            "written_per_step": mean("written"), "read_per_step": mean("read"), "projected_per_step": mean("projected"),
            "written_total_per_step": statistics.fmean(written), "projected_total_per_step": statistics.fmean(projected),
            "written_over_projected": sum(written) / sum(projected),
            "written_bytes_per_token": sum(written) / (tokens_per_step * len(steps)),
            "projected_bytes_per_token": sum(projected) / (tokens_per_step * len(steps)),
            "peak_rss": end["peak_rss"],
        }
    return out


def goals(a, grid: dict) -> dict:
    """(a) and (b): the largest K in bf16-sr against the smallest in fp32, all layers trained."""
    lo, hi = name_of(min(a.ks), "fp32", "all"), name_of(max(a.ks), "bf16-sr", "all")
    if lo not in grid or hi not in grid:
        return {}
    wear = grid[lo]["written_bytes_per_token"] / grid[hi]["written_bytes_per_token"]
    speed = grid[hi]["tokens_per_s"] / grid[lo]["tokens_per_s"]
    return {"config": hi, "baseline": lo,
            "a_bytes_per_token_ratio": wear, "a_target": 20.0, "a_met": wear >= 20.0,
            "b_tokens_per_s_ratio": speed, "b_target": 1.0, "b_met": speed >= 1.0}


# ----------------------------------------------------------------------------- quality

def scored_windows(stream: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) [B, L] covering ``stream``: every token after the first scored once
    (targets -1 where an earlier window scored it), windows half a window apart."""
    n = stream.numel()
    L = min(seq, n - 1)
    xs, ys, scored, start = [], [], 0, 0
    while scored < n - 1:
        start = min(start, n - 1 - L)
        x, y = stream[start:start + L].long(), stream[start + 1:start + L + 1].long().clone()
        y[torch.arange(start + 1, start + L + 1) <= scored] = -1
        xs.append(x)
        ys.append(y)
        scored, start = start + L, start + max(1, L // 2)
    return torch.stack(xs), torch.stack(ys)


def mean_loss(model, windows) -> float:
    from slowft.model import mean_loss as held_out_loss

    return held_out_loss(model.logits, *windows, batch=16)


def quality_settings(a) -> dict:
    """The demo's model shape and Adalite lr (finetune.py's DEMO and DEMO_LR: cosine to a fifth of
    it, 3 warm-up steps), and the small lr: finetune.py's default for real models (DEFAULT_LR),
    where a step moves each tensor by 0.1 % of its norm, under half a bf16 spacing for most elements."""
    import finetune

    return {"model": dict(finetune.DEMO),
            "lr": a.quality_lr or finetune.DEMO_LR["adalite"],
            "min_lr": a.quality_min_lr or (a.quality_lr or finetune.DEMO_LR["adalite"]) / 5,
            "small_lr": a.quality_small_lr or finetune.DEFAULT_LR["adalite"]}


def run_quality(a) -> dict:
    import slowft
    from slowft.data import TokenData
    from slowft.optim import constant_lr, cosine_with_warmup
    from slowft.tiny import make_tiny

    qs = quality_settings(a)
    shape = "-".join(f"{k}{v}" for k, v in qs["model"].items())
    model_dir = a.cache / f"quality-llama-{shape}"
    if not (model_dir / "params.json").exists():
        print(f"making the quality model {model_dir.name} ...", file=sys.stderr, flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
        make_tiny(model_dir, **qs["model"])
    data = TokenData.from_files(a.quality_data, slowft.Tokenizer(model_dir / "tokenizer.model"))
    cut = int(len(data) * (1 - a.holdout))
    train, held = TokenData(data.tokens[:cut], data.sources), data.tokens[cut:]
    train.check(a.quality_seq)
    windows = {"heldout": scored_windows(held, a.quality_seq), "train": scored_windows(train.tokens, a.quality_seq)}
    q = {"model": {**qs["model"], "dtype": "bfloat16"}, "data": [str(p) for p in data.sources], "tokens": len(data),
         "train_tokens": cut, "heldout_tokens": len(held), "heldout_scored": int((windows["heldout"][1] >= 0).sum()),
         "steps": a.quality_steps, "batch": a.quality_batch, "seq": a.quality_seq, "seed": a.seed, "optimizer": "adalite",
         "eval_every": a.quality_eval_every, "runs": {}}
    lrs = {"demo-lr": (cosine_with_warmup(qs["lr"], a.quality_steps, min(3, a.quality_steps), qs["min_lr"]),
                       f"{qs['lr']:g} cosine to {qs['min_lr']:g}, 3 warm-up"),
           "small-lr": (constant_lr(qs["small_lr"]), f"{qs['small_lr']:g} constant")}
    for variant, (schedule, desc) in lrs.items():
        runs = {k: (*v, None, a.seed) for k, v in QUALITY_STORAGES.items()}  # dtype, rounding, micro-batch, step seed
        if variant == "demo-lr":  # noise floors: bf16-sr with other rounding noise (step()'s seed; the same batches),
            runs["bf16-sr-seed+1"] = (*QUALITY_STORAGES["bf16-sr"], None, a.seed + 1)
            if a.quality_batch % 2 == 0:  # and fp32, the same arithmetic summed in another order (2 micro-batches)
                runs["fp32-accum2"] = ("float32", "nearest", a.quality_batch // 2, a.seed)
        for storage, (dtype, rounding, micro, step_seed) in runs.items():
            name = f"{variant}/{storage}"
            t0 = time.perf_counter()
            with slowft.load(model_dir, workdir=a.cache / "quality-work" / f"{variant}-{storage}", device=a.device,
                             storage_dtype=dtype, ram_budget=0, progress=False, rounding=rounding, reset_workdir=True) as m:
                before = {k: mean_loss(m, w) for k, w in windows.items()}
                opt, losses, curve = slowft.Adalite(lr=qs["lr"]), [], [[0, before["heldout"]]]
                for step in range(a.quality_steps):
                    opt.lr = schedule(step)
                    tokens, targets = train.batch(step, a.quality_batch, a.quality_seq, a.seed)
                    losses.append(m.step(tokens, targets, opt, seed=step_seed, micro_batch_size=micro))
                    if (step + 1) % a.quality_eval_every == 0 and step + 1 < a.quality_steps:
                        curve.append([step + 1, mean_loss(m, windows["heldout"])])
                after = {k: mean_loss(m, w) for k, w in windows.items()}
            curve.append([a.quality_steps, after["heldout"]])
            q["runs"][name] = {"storage_dtype": dtype, "rounding": rounding if dtype == "bfloat16" else None, "lr": desc,
                               "micro_batch_size": micro or a.quality_batch, "step_seed": step_seed,
                               "heldout_before": before["heldout"], "heldout_after": after["heldout"],
                               "heldout_best": min(x for _, x in curve), "heldout_curve": curve,
                               "train_before": before["train"], "train_after": after["train"],
                               "first_step_loss": losses[0], "last_step_loss": losses[-1], "s": time.perf_counter() - t0}
            print(f"quality {name}: held-out {before['heldout']:.4f} -> {after['heldout']:.4f}", file=sys.stderr, flush=True)
        ref = q["runs"][f"{variant}/fp32"]
        for storage in runs:
            run = q["runs"][f"{variant}/{storage}"]
            if storage == "fp32":
                continue
            run["heldout_gap_vs_fp32"] = run["heldout_after"] / ref["heldout_after"] - 1
            run["heldout_best_gap_vs_fp32"] = run["heldout_best"] / ref["heldout_best"] - 1
            run["train_gap_vs_fp32"] = run["train_after"] / ref["train_after"] - 1
            gained = ref["train_before"] - ref["train_after"]  # how much of fp32's progress on the training text it made
            run["train_progress_vs_fp32"] = (run["train_before"] - run["train_after"]) / gained if gained else None
    q["goal"] = {v: {"bf16_sr_heldout_gap": q["runs"][f"{v}/bf16-sr"]["heldout_gap_vs_fp32"], "target": 0.01,
                     "met": abs(q["runs"][f"{v}/bf16-sr"]["heldout_gap_vs_fp32"]) <= 0.01} for v in lrs}
    q["goal"]["demo-lr"]["bf16_sr_reseeded_gap"] = q["runs"]["demo-lr/bf16-sr-seed+1"]["heldout_gap_vs_fp32"]
    if "demo-lr/fp32-accum2" in q["runs"]:
        q["goal"]["demo-lr"]["fp32_noise_floor_gap"] = q["runs"]["demo-lr/fp32-accum2"]["heldout_gap_vs_fp32"]
    return q


# ----------------------------------------------------------------------------- report

def print_grid(a, r: dict) -> None:
    grid = r["grid"]
    print(f"\nslowft SSD wear: {r['machine']}; dim {a.dim}, {a.layers} layers, {a.heads} heads, vocab {VOCAB}; "
          f"micro-batch {a.batch} x {a.seq}; SGD lr {a.lr:g}; ram budget {mb(a.ram_budget)}; device {a.device}; "
          f"page cache {r['page_cache']}; median of {a.steps} interleaved rounds after 1 warm-up step")
    head = (f"  {'config':<16}{'tok/step':>9}{'tok/s':>8}{'wrote/step':>12}{'projected':>11}{'meas/proj':>10}"
            f"{'per token':>11}{'weights':>9}{'optim':>7}{'inputs':>8}{'grads':>8}{'journal':>9}{'peak RSS':>10}")
    print(head)
    for name, g in grid.items():
        w = g["written_per_step"]
        print(f"  {name:<16}{g['tokens_per_step']:>9,}{g['tokens_per_s']:>8,.0f}{mb(g['written_total_per_step']):>12}"
              f"{mb(g['projected_total_per_step']):>11}{g['written_over_projected']:>10.3f}"
              f"{g['written_bytes_per_token'] / 1e3:>8,.1f} kB"
              + "".join(f"{w[c] / 1e6:>{n},.1f}" for c, n in zip(CATEGORIES, (9, 7, 8, 8, 9)))
              + f"{mb(g['peak_rss']):>10}")
    print("  (MB per step by category; per token: bytes written per trained token; meas/proj: measured / projected bytes)")
    gl = r.get("goals")
    if gl:
        print(f"  goal (a): {gl['config']} writes {gl['a_bytes_per_token_ratio']:.1f}x fewer bytes per trained token than "
              f"{gl['baseline']} (target >= 20x): {'met' if gl['a_met'] else 'NOT met'}")
        print(f"  goal (b): its tokens/s are {gl['b_tokens_per_s_ratio']:.2f}x {gl['baseline']}'s (target >= 1): "
              f"{'met' if gl['b_met'] else 'NOT met'}")


def print_quality(q: dict) -> None:
    print(f"\nquality: demo shape (dim {q['model']['dim']}, {q['model']['layers']} layers), {q['tokens']} tokens "
          f"({q['heldout_tokens']} held out, {q['heldout_scored']} scored); {q['steps']} steps of {q['batch']} x {q['seq']}, "
          f"Adalite, seed {q['seed']}, ram budget 0")
    pct = lambda x: "" if x is None else f"{x:+.2%}"  # noqa: E731
    print(f"  {'run':<24}{'lr':<36}{'held-out':>9}{'after':>8}{'gap':>8}{'best':>8}{'gap':>8}"
          f"{'train':>8}{'after':>8}{'gap':>8}{'progress':>10}")
    for name, run in q["runs"].items():
        prog = run.get("train_progress_vs_fp32")
        print(f"  {name:<24}{run['lr']:<36}{run['heldout_before']:>9.4f}{run['heldout_after']:>8.4f}"
              f"{pct(run.get('heldout_gap_vs_fp32')):>8}{run['heldout_best']:>8.4f}{pct(run.get('heldout_best_gap_vs_fp32')):>8}"
              f"{run['train_before']:>8.4f}{run['train_after']:>8.4f}{pct(run.get('train_gap_vs_fp32')):>8}"
              f"{'' if prog is None else f'{prog:.2f}':>10}")
    print(f"  (held-out: before, after, gap of after vs fp32's, best of the evaluations every {q['eval_every']} steps "
          "and its gap; train: the training text's loss before, after, gap; progress: its drop as a fraction of fp32's; "
          "bf16-sr-seed+1: step()'s seed + 1, other rounding noise on the same batches; "
          "fp32-accum2: fp32 with the batch in 2 micro-batches, the same arithmetic summed in another order)")
    for v, g in q["goal"].items():
        floors = [f"bf16-sr with other rounding noise {g['bf16_sr_reseeded_gap']:+.2%}"] if "bf16_sr_reseeded_gap" in g else []
        floors += [f"fp32 summed in another order {g['fp32_noise_floor_gap']:+.2%}"] if "fp32_noise_floor_gap" in g else []
        print(f"  goal ({v}): bf16-sr held-out loss within 1 % of fp32's: {g['bf16_sr_heldout_gap']:+.2%}, "
              f"{'met' if g['met'] else 'NOT met'}" + (f" (against fp32: {', '.join(floors)})" if floors else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="rounds: timed steps of each configuration, after 1 warm-up step")
    ap.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="--no-grid: the quality runs alone")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="micro-batches per step")
    ap.add_argument("--storages", nargs="+", choices=list(STORAGES), default=list(STORAGES))
    ap.add_argument("--trained", nargs="+", choices=list(TRAINED), default=list(TRAINED))
    ap.add_argument("--lr", type=float, default=1e-4, help="SGD's, in the grid")
    ap.add_argument("--ram-budget", type=float, default=0, help="bytes for resident blocks/inputs (0: all via disk)")
    ap.add_argument("--page-cache", choices=["auto", "on", "off"], default="auto",
                    help="auto: on where the page cache holds every configuration's work dir at once (slowft's rule)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quality-steps", type=int, default=60)
    ap.add_argument("--quality-batch", type=int, default=8)
    ap.add_argument("--quality-seq", type=int, default=64)
    ap.add_argument("--quality-lr", type=float, default=None, help="default: the demo's (finetune.py's DEMO_LR)")
    ap.add_argument("--quality-min-lr", type=float, default=None, help="default: --quality-lr / 5, as the demo")
    ap.add_argument("--quality-small-lr", type=float, default=None,
                    help="default: finetune.py's adalite lr for real models (DEFAULT_LR)")
    ap.add_argument("--quality-eval-every", type=int, default=10, help="held-out loss every N steps (for the best)")
    ap.add_argument("--quality-data", type=Path, nargs="+", default=[ROOT / "test_data"])
    ap.add_argument("--holdout", type=float, default=0.1, help="fraction of the token stream held out, from its end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-workdirs", action="store_true", help="keep the grid's work dirs (default: removed at the end)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slowft-bench")
    ap.add_argument("--worker", choices=["grid"])
    ap.add_argument("--config")
    a = ap.parse_args()
    a.ram_budget = int(a.ram_budget)
    if a.worker:
        worker_grid(a)
        return

    started = time.perf_counter()
    a.cache.mkdir(parents=True, exist_ok=True)
    a.ks = sorted(set(a.ks))
    r = {"machine": f"{os.cpu_count()} cpu, {os.uname().machine}, torch {torch.__version__}",
         "model": {"dim": a.dim, "layers": a.layers, "heads": a.heads, "vocab": VOCAB},
         "batch": a.batch, "seq": a.seq, "steps": a.steps, "ks": a.ks, "lr": a.lr, "optimizer": "sgd",
         "ram_budget": a.ram_budget, "device": a.device}
    if a.grid:
        try:
            r["grid"] = run_grid(a, r)
        finally:
            if not a.keep_workdirs:
                shutil.rmtree(a.cache / "wear-work", ignore_errors=True)
        r["goals"] = goals(a, r["grid"])
        r["grid_s"] = time.perf_counter() - started
    if a.quality:
        t0 = time.perf_counter()
        r["quality"] = run_quality(a)
        r["quality_s"] = time.perf_counter() - t0
        shutil.rmtree(a.cache / "quality-work", ignore_errors=True)
    r["total_s"] = time.perf_counter() - started
    if a.grid:
        print_grid(a, r)
    if a.quality:
        print_quality(r["quality"])
    print(f"\n  total {r['total_s']:.0f} s" + (f" (grid {r['grid_s']:.0f} s)" if a.grid else ""))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
