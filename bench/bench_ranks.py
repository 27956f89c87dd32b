#!/usr/bin/env python
"""Data-parallel: one process against two ranks under torchrun on this machine, the same global batch.

    python bench/bench_ranks.py                 # dim 512, 8 layers, llama2's vocab (~0.23 GB in fp32), 3 rounds
    python bench/bench_ranks.py --dim 64 --layers 2 --heads 4 --seq 16 --steps 2 --rounds 1   # smoke test

A random llama2-shaped model (bench_step.py's ``make_model``) is fine-tuned by finetune.py with
SGD, an fp32 work dir and ``--ram-budget 0`` (every unit through the work dir each step, as for a
model larger than memory), ``--grad-accum`` K micro-batches of B x S tokens a step: once as a
single process, once as 2 ranks started by ``torchrun --standalone --nproc-per-node 2`` (each
takes K/2 of the micro-batches; torchrun gives each rank one CPU thread, the single process
keeps torch's default). The runs alternate (1, 2, then 2, 1, ...) for ``--rounds`` rounds, so this
VM's drift between minutes falls on both. From each run's metrics.jsonl (rank 0's): the median
step time of its steps after the first, the bytes all-reduced a step, the seconds a step
spent in all-reduce (waiting for the other rank included), and the bytes a step wrote to rank
0's work dir per trained token of the whole step (median). Beside them, the peak RSS of each
finetune.py process, sampled every 20 ms (the largest rank's).

Figures: the step time of 2 ranks over 1 per round (and its spread), the bytes all-reduced a
step against the model's size in fp32 (every weight's gradient once, and the loss), the
all-reduce's share of a step, and the last loss of each (equal but for rounding). The last
stdout line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import make_model  # noqa: E402


def run(ranks: int, model: Path, tmp: Path, a) -> dict:
    """One fine-tune of ``a.steps + 1`` steps; its timed figures from rank 0's metrics.jsonl."""
    out = tmp / f"out-{ranks}"
    train = [str(model), "--steps", str(a.steps + 1), "--batch-size", str(a.batch), "--grad-accum", str(a.k),
             "--seq-len", str(a.seq), "--optimizer", "sgd", "--lr", "1e-3", "--schedule", "constant", "--device", "cpu",
             "--storage-dtype", "float32", "--ram-budget", "0", "--out", str(out), "--workdir", str(tmp / f"w-{ranks}"),
             "--reset-workdir", "--export-dtype", "float32"]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(ranks)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*launcher, str(ROOT / "finetune.py"), *train], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, text=True, env={**os.environ, "SLOWFT_CACHE": str(tmp / "cache")})
        peaks = peak_rss_of_ranks(proc)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{ranks} rank(s) failed:\n{err.read()[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s][1:]  # the first step warms up
    return {"step_s": statistics.median(s["step_s"] for s in steps), "loss": steps[-1]["loss"],
            "reduced_bytes": steps[-1].get("reduced_bytes", 0), "reduce_s": statistics.median(s.get("reduce_s", 0.0) for s in steps),
            "written_per_token": statistics.median(sum(s["written_bytes"].values()) / s["tokens"] for s in steps),
            "peak_rss": max(peaks.values()), "wall_s": time.perf_counter() - t0}


def peak_rss_of_ranks(proc: subprocess.Popen) -> dict[int, int]:
    """Waits for ``proc``; meanwhile samples (every 20 ms) the resident set of each finetune.py
    process in its tree (the ranks, not torchrun's agent): pid -> its largest."""
    peaks: dict[int, int] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                cmd = p.cmdline()
                if any(c.endswith("finetune.py") for c in cmd) and "torch.distributed.run" not in cmd:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
        except psutil.Error:  # (a process that ended between the listing and the reading)
            pass
        time.sleep(0.02)
    return peaks or {proc.pid: 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="micro-batches a step (even: 2 ranks take half each)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps a run, after one warm-up step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slowft-bench")
    a = ap.parse_args()
    model = make_model(a.dim, a.layers, a.heads, a.cache)
    from slowft.checkpoint import n_params
    from slowft.formats import open_source
    fp32 = 4 * n_params(open_source(model).args)
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(dir=a.cache) as tmp:
        for i in range(a.rounds):
            for ranks in ((1, 2) if i % 2 == 0 else (2, 1)):
                results[ranks].append(run(ranks, model, Path(tmp), a))
                print(f"round {i + 1}: {ranks} rank(s): step {results[ranks][-1]['step_s']:.2f} s", file=sys.stderr)
    ratios = [two["step_s"] / one["step_s"] for one, two in zip(results[1], results[2])]
    two = results[2]
    out = {
        "model_fp32_bytes": fp32, "tokens_per_step": a.k * a.batch * a.seq,
        "step_s": {str(k): [r["step_s"] for r in v] for k, v in results.items()},
        "ratio_2_over_1": ratios, "ratio_median": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
        "reduced_bytes_per_step": two[-1]["reduced_bytes"], "reduced_over_model": two[-1]["reduced_bytes"] / fp32,
        "reduce_s": [r["reduce_s"] for r in two], "reduce_share": [r["reduce_s"] / r["step_s"] for r in two],
        "reduce_MBps": [r["reduced_bytes"] / r["reduce_s"] / 1e6 if r["reduce_s"] else None for r in two],
        "loss": {str(k): v[-1]["loss"] for k, v in results.items()},
        "written_per_token": {str(k): [r["written_per_token"] for r in v] for k, v in results.items()},
        "peak_rss": {str(k): [r["peak_rss"] for r in v] for k, v in results.items()},
    }
    print(f"model {fp32 / 1e9:.2f} GB in fp32, {out['tokens_per_step']} tokens a step, {a.rounds} rounds\n"
          f"step time, 2 ranks over 1: median {out['ratio_median']:.2f} (spread {min(ratios):.2f}-{max(ratios):.2f})\n"
          f"all-reduced a step: {out['reduced_bytes_per_step'] / 1e9:.3f} GB ({out['reduced_over_model']:.4f} x the model in fp32), "
          f"{statistics.median(out['reduce_share']):.0%} of a step\n"
          + "".join(f"{k} rank(s): {statistics.median(out['written_per_token'][k]) / 1e3:,.1f} KB written to a rank's SSD per "
                    f"trained token, peak RSS {max(out['peak_rss'][k]) / 1e6:,.0f} MB (the largest rank's)\n" for k in ("1", "2")))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
