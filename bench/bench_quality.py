#!/usr/bin/env python
"""Does it learn as well as AdamW? slowft's optimizers against torch's AdamW on one fine-tune.

    python bench/bench_quality.py                      # ~10 minutes on 2 CPU cores
    python bench/bench_quality.py --steps 4 --pretrain-steps 20 --lrs 1 --no-plot   # a smoke run

1. A small llama2 (dim 256, 4 layers, a 512-piece sentencepiece tokenizer trained on both texts
   below) is pretrained in RAM with torch's AdamW on one body of generated text (short
   narrative sentences from a grammar) until its loss flattens, and saved in Meta's format.
2. It is fine-tuned on a *different* body of text (question/answer documents about made-up
   ships and towns), a tenth of the documents held out, with the same batches, token budget and
   schedule (linear warmup, cosine decay) for each of: torch.optim.AdamW in RAM (the
   reference); slowft's adamw, adalite, adalomo and sgd, every unit through the work dir each
   step (``--ram-budget 0``, fp32 storage); LoRA (``lora``: rank ``--lora-rank`` adapters of
   every block matrix, AdamW, the base only read); each at the best of a sweep of learning rates
   (3 by default); then the best full fine-tune again with bf16 storage and stochastic rounding.
3. Reported for each: held-out loss before and every ``--eval-every`` steps, bytes written to
   the work dir per step (measured), seconds per step (median), peak RSS (sampled), the sweep; goals: slowft adamw's
   held-out curve within 1e-3 relative of torch's at every eval, and the best of adalite and
   adalomo reaching >= 90 % of AdamW's held-out loss drop at <= 40 % of its bytes written per
   step. A plot (``bench/quality.png``) and, last, one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import slowft  # noqa: E402
from slowft.data import TokenData  # noqa: E402
from slowft.model import ModelArgs, Transformer, cross_entropy, mean_loss  # noqa: E402
from slowft.optim import cosine_with_warmup, make_optimizer  # noqa: E402
from slowft.tiny import train_tokenizer, write_model  # noqa: E402

LRS = {  # per optimizer, the best of a first sweep (a third lower) in the middle (bench/NOTES.md, stop 22)
    "torch-adamw": [1e-3, 3e-3, 1e-2], "adamw": [1e-3, 3e-3, 1e-2], "adalite": [1e-2, 3e-2, 1e-1],
    "adalomo": [3e-3, 1e-2, 3e-2], "sgd": [0.03, 0.1, 0.3],
    "lora": [1e-3, 3e-3, 1e-2],  # LoRA (rank --lora-rank, every block matrix) with AdamW: the base only read
}

# ----------------------------------------------------------------------------- generated text

NAMES = ["Maren", "Tobias", "Ilse", "Corwin", "Saga", "Edda", "Rune", "Linnea", "Bram", "Ottilie", "Jory", "Wenna"]
PLACES = ["the harbour", "the mill", "the chapel", "the market", "the lighthouse", "the ferry", "the orchard", "the quay"]
THINGS = ["a lantern", "the nets", "a letter", "two loaves", "the ledger", "a coil of rope", "the keys", "a basket of apples"]
VERBS = ["carried", "mended", "sold", "found", "counted", "painted", "hid", "lost"]
TIMES = ["before dawn", "at noon", "after the storm", "on market day", "at dusk", "in the rain"]
SHIPS = ["Gull", "Heron", "Tern", "Kestrel", "Plover", "Osprey", "Curlew", "Merlin", "Petrel", "Shrike"]
TOWNS = ["Oskeby", "Varnholm", "Listrup", "Kerrow", "Dunmere", "Halsey", "Brennick", "Ulvik", "Tarrow", "Eastling"]
CARGO = ["salt", "timber", "wool", "herring", "slate", "barley", "copper", "tar"]


def narrative(rng: random.Random, n: int) -> list[str]:
    """Pretraining text: short narrative sentences, a few to a paragraph."""
    out = []
    for _ in range(n):
        sents = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)} to {rng.choice(PLACES)} {rng.choice(TIMES)}."
                 for _ in range(rng.randint(3, 6))]
        out.append(" ".join(sents))
    return out


def qa_documents(rng: random.Random, n: int) -> list[str]:
    """Fine-tuning text: a ship's facts, then questions answered from them (a format to learn,
    and answers that copy the facts stated earlier in the document)."""
    out = []
    for _ in range(n):
        ship, home, port, cargo = rng.choice(SHIPS), rng.choice(TOWNS), rng.choice(TOWNS), rng.choice(CARGO)
        crew = rng.randint(3, 19)
        facts = f"The {ship} sails from {home} to {port} with {cargo}. She has a crew of {crew}."
        qa = [(f"Where does the {ship} sail from?", f"The {ship} sails from {home}."),
              (f"Where is the {ship} bound?", f"She is bound for {port}."),
              (f"What does the {ship} carry?", f"She carries {cargo}."),
              (f"How many crew does the {ship} have?", f"A crew of {crew}.")]
        rng.shuffle(qa)
        out.append(facts + "\n" + "\n".join(f"Q: {q}\nA: {a}" for q, a in qa[:3]))
    return out


def write_docs(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(d + "\n")
    return folder


# ----------------------------------------------------------------------------- the pretrained model

def pretrain(root: Path, a) -> tuple[Path, dict]:
    """The model every fine-tune starts from, pretrained in RAM until its loss flattens."""
    rng = random.Random(0)
    pre, ft = write_docs(root / "pretrain", narrative(rng, 1500)), write_docs(root / "finetune", qa_documents(rng, 400))
    tok_path = root / "tokenizer.model"
    vocab = train_tokenizer([pre, ft], 512, tok_path)
    params = {"dim": a.dim, "n_layers": a.layers, "n_heads": a.heads, "multiple_of": 64, "norm_eps": 1e-5, "vocab_size": -1}
    args = ModelArgs.from_params(params, vocab_size=vocab)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
    data = TokenData.from_files([pre], slowft.Tokenizer(tok_path))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = cosine_with_warmup(1e-3, a.pretrain_steps, 20, 1e-4)
    losses, t0 = [], time.perf_counter()
    for step in range(a.pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = sched(step)
        tokens, targets = data.batch(step, 16, a.seq, seed=1)
        loss = cross_entropy(model(tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = max(1, len(losses) // 10)
    report = {"steps": a.pretrain_steps, "seconds": time.perf_counter() - t0, "first_loss": losses[0],
              "last_tenth_mean": statistics.fmean(losses[-tail:]), "previous_tenth_mean": statistics.fmean(losses[-2 * tail:-tail])}
    print(f"pretrained {a.pretrain_steps} steps in {report['seconds']:.0f} s: loss {losses[0]:.3f} -> "
          f"{report['last_tenth_mean']:.3f} (the tenth before: {report['previous_tenth_mean']:.3f})", flush=True)
    return write_model(root / "model", params, model, tok_path, shards=1, dtype="float32"), report


def split_documents(folder: Path, tok: slowft.Tokenizer) -> tuple[TokenData, TokenData]:
    """(training documents, held-out documents): the last tenth of the documents held out."""
    files = sorted(folder.glob("*.txt"))
    n_val = len(files) // 10
    return TokenData.from_files(files[:-n_val], tok), TokenData.from_files(files[-n_val:], tok)


# ----------------------------------------------------------------------------- one fine-tune

def evaluate(logits_fn, x: torch.Tensor, y: torch.Tensor) -> float:
    return mean_loss(logits_fn, x, y, batch=8)


def finetune_torch(src: Path, lr: float, data: TokenData, val, a) -> dict:
    """The reference: torch.optim.AdamW on the whole model in RAM."""
    weights = torch.load(src / "consolidated.00.pth", weights_only=True)  # (written as one fp32 shard)
    params = json.loads((src / "params.json").read_text())
    model = Transformer(ModelArgs.from_params(params, vocab_size=weights["output.weight"].shape[0]))
    model.load_state_dict({k: v.float() for k, v in weights.items() if k != "rope.freqs"})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = cosine_with_warmup(lr, a.steps, a.warmup, lr / 10)
    logits = model
    curve, times = [evaluate(logits, *val)], []
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = sched(step)
        tokens, targets = data.batch(step, a.batch, a.seq, seed=2)
        t0 = time.perf_counter()
        loss = cross_entropy(model(tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            curve.append(evaluate(logits, *val))
    return {"curve": curve, "step_s": statistics.median(times), "written_per_step": 0}


class PeakRSS:
    """The process's largest resident set while a run goes on, sampled every 5 ms by a thread."""

    def __enter__(self):
        proc = psutil.Process()
        self.start = self.peak = proc.memory_info().rss  # (the process's: earlier runs' memory counts in both)
        self.done = threading.Event()

        def sample():
            while not self.done.wait(0.005):
                self.peak = max(self.peak, proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def finetune_slowft(src: Path, name: str, lr: float, data: TokenData, val, a, work: Path, storage: str = "float32") -> dict:
    """slowft with every unit through the work dir each step (LoRA: read, and only the adapters learn)."""
    opt = make_optimizer(name, lr) if name not in ("adamw", "lora") else make_optimizer("adamw", lr, 0.01)
    sched = cosine_with_warmup(lr, a.steps, a.warmup, lr / 10)
    gc.collect()
    with slowft.load(src, workdir=work, device="cpu", storage_dtype=storage, ram_budget=0, progress=False,
                     reset_workdir=True) as model, PeakRSS() as rss:
        if name == "lora":
            model.enable_lora(a.lora_rank)
        logits = model.logits
        curve, times, written = [evaluate(logits, *val)], [], []
        for step in range(a.steps):
            opt.lr = sched(step)
            tokens, targets = data.batch(step, a.batch, a.seq, seed=2)
            model.io.drain()
            before, t0 = model.store.stats.snapshot(), time.perf_counter()
            try:
                model.step(tokens, targets, opt)
            except slowft.NonFiniteError:  # diverged: the sweep marks its later evals inf
                break
            model.io.drain()
            times.append(time.perf_counter() - t0)
            written.append(sum(model.store.stats.delta(model.store.stats.snapshot(), before)["written"].values()))
            if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
                curve.append(evaluate(logits, *val))
    return {"curve": curve, "step_s": statistics.median(times) if times else math.nan,
            "written_per_step": statistics.fmean(written[1:] or written) if written else math.nan, "peak_rss": rss.peak,
            "rss_growth": rss.peak - rss.start}


def n_evals(a) -> int:
    return 1 + len([s for s in range(a.steps) if (s + 1) % a.eval_every == 0 or s + 1 == a.steps])


# ----------------------------------------------------------------------------- the sweep and the report

def sweep(src: Path, data: TokenData, val, a, work: Path) -> dict:
    """Every optimizer at each of its learning rates: {name: {lr: run}}."""
    runs: dict = {}
    for name in a.optimizers:
        for lr in LRS[name][: a.lrs] if a.lrs < 3 else LRS[name]:
            t0 = time.perf_counter()
            run = (finetune_torch(src, lr, data, val, a) if name == "torch-adamw"
                   else finetune_slowft(src, name, lr, data, val, a, work / f"{name}-{lr:g}"))
            run["curve"] += [math.inf] * (n_evals(a) - len(run["curve"]))  # diverged: no later evals
            runs.setdefault(name, {})[lr] = run
            print(f"  {name:<12} lr {lr:<7g} held-out {run['curve'][0]:.4f} -> {run['curve'][-1]:.4f}  "
                  f"{run['step_s']:.3f} s/step  wrote {run['written_per_step'] / 1e6:.2f} MB/step  "
                  f"peak RSS {run.get('peak_rss', 0) / 1e6:.0f} MB (+{run.get('rss_growth', 0) / 1e6:.0f} MB in the run)  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return runs


def best(runs: dict) -> dict:
    """{name: (lr, run)} at each optimizer's lowest final held-out loss."""
    return {name: min(by_lr.items(), key=lambda kv: kv[1]["curve"][-1]) for name, by_lr in runs.items()}


def goals(runs: dict, chosen: dict) -> dict:
    out = {}
    if "torch-adamw" in runs and "adamw" in runs:
        def diff(lr):  # the largest relative gap between the two held-out curves at ``lr``, over every eval
            return max(abs(g - r) / r for g, r in zip(runs["adamw"][lr]["curve"], runs["torch-adamw"][lr]["curve"]))

        lr = chosen["torch-adamw"][0]
        out["adamw_max_rel_diff"] = diff(lr) if lr in runs["adamw"] else None  # at torch's best lr: the goal
        out["adamw_max_rel_diff_any_lr"] = max(diff(lr) for lr in set(runs["adamw"]) & set(runs["torch-adamw"]))
    if "adamw" in chosen:
        ref = chosen["adamw"][1]
        drop = ref["curve"][0] - ref["curve"][-1]
        for name in ("adalite", "adalomo", "sgd", "lora"):
            if name in chosen:
                run = chosen[name][1]
                out[f"{name}_drop_share"] = (run["curve"][0] - run["curve"][-1]) / drop if drop > 0 else None
                out[f"{name}_written_share"] = run["written_per_step"] / ref["written_per_step"]
    return out


def plot(chosen: dict, extra: dict, a, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0] + [s + 1 for s in range(a.steps) if (s + 1) % a.eval_every == 0 or s + 1 == a.steps]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, (lr, run) in chosen.items():
        ax.plot(steps, run["curve"], marker="o", ms=3, label=f"{name} (lr {lr:g})")
    for label, run in extra.items():
        ax.plot(steps, run["curve"], ls="--", label=label)
    ax.set_xlabel(f"step ({a.batch} x {a.seq} tokens each)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Fine-tuning a pretrained dim-256 llama2: each optimizer at its best lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps (each optimizer, each lr)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lrs", type=int, default=3, help="learning rates swept per optimizer (1-3)")
    ap.add_argument("--optimizers", nargs="+", default=list(LRS), choices=list(LRS))
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "quality.png")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slowft-quality-") as tmp:
        root = Path(tmp)
        src, pre = pretrain(root, a)
        data, held = split_documents(root / "finetune", slowft.Tokenizer(src / "tokenizer.model"))
        val = held.windows(a.seq)
        print(f"fine-tuning on {len(data):,} tokens, {val[1].numel():,} held out; {a.steps} steps of {a.batch} x {a.seq}", flush=True)
        runs = sweep(src, data, val, a, root / "work")
        chosen = best(runs)
        slow = {k: v for k, v in chosen.items() if k not in ("torch-adamw", "lora")}  # full fine-tunes
        top = min(slow, key=lambda k: slow[k][1]["curve"][-1]) if slow else None
        extra = {}
        if top:
            lr = chosen[top][0]
            extra[f"{top} bf16 stochastic (lr {lr:g})"] = bf16 = finetune_slowft(src, top, lr, data, val, a, root / "work" / "bf16", "bfloat16")
            bf16["curve"] += [math.inf] * (n_evals(a) - len(bf16["curve"]))
            print(f"  {top} in bf16 (stochastic): held-out {bf16['curve'][-1]:.4f}, wrote {bf16['written_per_step'] / 1e6:.1f} MB/step")
    g = goals(runs, chosen)
    print("best: " + ", ".join(f"{k} lr {lr:g} -> {r['curve'][-1]:.4f}" for k, (lr, r) in chosen.items()))
    print("goals: " + ", ".join(f"{k} {v:.4g}" for k, v in g.items() if v is not None))
    if not a.no_plot:
        plot(chosen, extra, a, a.plot)
    print(json.dumps({"pretrain": pre, "args": {k: str(v) for k, v in vars(a).items()}, "runs": {k: {str(lr): r for lr, r in v.items()} for k, v in runs.items()},
                      "best": {k: {"lr": lr, **r} for k, (lr, r) in chosen.items()}, "bf16": extra, "goals": g}))


if __name__ == "__main__":
    main()
