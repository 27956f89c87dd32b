#!/usr/bin/env python
"""Fine-tune every weight of a llama model that does not fit in memory (or, with --lora-rank,
low-rank adapters of it, the base only read).

    python finetune.py path/to/llama-2-13b --data notes.txt     # your model, your text
    python finetune.py --demo                                   # a tiny model made on the fly (~1 min)

    torchrun --nproc-per-node 2 finetune.py ...                 # data-parallel ranks (README: Two machines)

The recipe, top to bottom: parse_args (the command line) -> join_ranks (under torchrun: the
other ranks) -> check_inputs (the model folder, the data, --out and the projected SSD writes:
mistakes surface in the first second, before anything is written; with ranks, the same on every
rank) -> start_or_resume (import the model into the work dir, or resume an unfinished run) ->
plan_summary -> train (step by step, each logged; RunMeter) -> finish (export to --out, in the
source's layout or --export-format's).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slowft import faults
from slowft.checkpoint import DTYPE_NAMES, expected_shapes, foreign_file, import_model, n_params, unit_shapes
from slowft.cli import ArgumentParser, parse_size, run
from slowft.data import TokenData
from slowft.distributed import DEFAULT_TIMEOUT_S, Ranks, folder_digest, world_size
from slowft.errors import Diverged, Interrupted, NonFiniteError, RankLost, RanksDiverged, SlowftError
from slowft.formats import FORMATS, open_source, writer
from slowft.formats import meta as meta_format
from slowft.generate import generate
from slowft.lora import TARGETS as LORA_TARGETS
from slowft.lora import check_lora
from slowft.lora import journal_bytes as lora_journal_bytes
from slowft.model import mean_loss
from slowft.offloaded import (ROUNDINGS, OffloadedModel, cache_root, check_export_path, default_ram_budget, open_workdir,
                              pick_device, workdir_path)
from slowft.optim import OPTIMIZER_COSTS, OPTIMIZERS, constant_lr, cosine_with_warmup, make_optimizer, state_bytes
from slowft.plan import Layout, lisa_layers, plan_step, projected_writes, reduced_bytes
from slowft.plot import write_loss_plot
from slowft.progress import RunBar, StepProgress
from slowft.train import SYNC_EVERY_S
from slowft.tiny import TEST_DATA, make_tiny
from slowft.tokenizer import BaseTokenizer

# Settings that change the numbers: an unfinished run resumes only with the same values.
RUN_SETTINGS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps", "schedule", "optimizer",
                "weight_decay", "betas", "optim_state_dtype", "dropout", "seed", "compute_dtype", "rounding",
                "train_layers", "lisa", "train_on_prompt", "freeze_embeddings", "freeze_head", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_targets")
# For llama2-sized models, each moving weights by ~0.05-0.1 % a step (adalite: each tensor by lr
# of its norm; adamw's is llama2 fine-tunes' usual): extrapolated, not measured here (README,
# "Which optimizer"; bench/bench_quality.py measured a dim-256 model only).
LORA_LR = 2e-4  # LoRA's usual for AdamW on llama (PEFT's and mlx-lm's examples: 1e-4 to 2e-4)
DEFAULT_LR = {"adalite": 1e-3, "adalomo": 5e-4, "adamw": 1e-5, "sgd": 1e-3}
DEMO_LR = {"adalite": 6e-2, "adalomo": 3e-2, "adamw": 1e-3, "sgd": 0.5}  # a tiny random model takes large steps
DEMO = dict(dim=128, layers=4, heads=4, kv_heads=2, shards=2, vocab=512, seed=0)
DEMO_PROMPT = "The keeper of the north light"


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description="Full-parameter fine-tuning of llama models with the weights on SSD.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="optimizers (--optimizer), their memory and SSD cost:\n"
                               + "\n".join(f"  {k:<8} {v}" for k, v in OPTIMIZER_COSTS.items()))
    ap.add_argument("model", nargs="?", type=Path, help="a llama2 / Llama 3 folder: Meta's (params.json, consolidated.NN.pth) "
                                                        "or Hugging Face's (config.json, *.safetensors)")
    ap.add_argument("--demo", action="store_true", help="train a tiny model made on the fly (the default without a model)")
    ap.add_argument("--data", type=Path, nargs="+", default=[TEST_DATA], help="plain-text and JSONL file(s), or folders of them (default: test_data/)")
    ap.add_argument("--val-data", type=Path, nargs="+", default=None, help="held-out text or JSONL: its loss is evaluated, never trained on")
    ap.add_argument("--train-on-prompt", action="store_true",
                    help="JSONL prompts and user turns count towards the loss too (default: only completions and answers)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="hold out this share of --data's documents (by seed) instead, in (0, 0.5]")
    ap.add_argument("--out", type=Path, help="run folder: model/ (the export), metrics.jsonl, checkpoints/ (default: out/<model>)")
    ap.add_argument("--workdir", type=Path, help="where the blocks live while training (default: ~/.cache/slowft/...)")
    ap.add_argument("--reset-workdir", action="store_true", help="discard the work dir's contents and start over")
    ap.add_argument("--resume", action="store_true", help="continue the unfinished run in the work dir")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=32,
                    help="micro-batches per step: each unit is read and written once per step, so the SSD writes "
                         "per trained token fall as this grows (tokens per step = this x --batch-size x --seq-len)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None,
                    help="default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                    + " (adalite moves each tensor by lr of its norm a step)")
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adalite",
                    help="see the list below")
    ap.add_argument("--weight-decay", type=float, default=None, help="sgd, adalomo (default 0) and adamw (default 0.01)")
    ap.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"), help="adamw's (default 0.9 0.999)")
    ap.add_argument("--optim-state-dtype", choices=["float32", "bfloat16"], default=None,
                    help="adamw's two state tensors: bfloat16 halves their bytes (stochastically rounded)")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), mps, cuda, cpu")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--storage-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="the work dir's weights: bfloat16 halves its size and SSD writes (updates rounded stochastically)")
    ap.add_argument("--rounding", choices=list(ROUNDINGS), default="stochastic",
                    help="how bfloat16 storage rounds each update: stochastic keeps updates below bf16's resolution "
                         "(on average), nearest loses them")
    ap.add_argument("--train-layers", metavar="A-B", help="train only blocks A to B (inclusive, 0-based); the rest is read, never written")
    ap.add_argument("--freeze-embeddings", action="store_true", help="do not train the token embedding")
    ap.add_argument("--freeze-head", action="store_true", help="do not train the final norm and output projection")
    ap.add_argument("--lisa", type=int, default=0, metavar="N",
                    help="train N blocks per step, sampled anew each step (LISA); the others are frozen for that step")
    ap.add_argument("--max-ssd-writes", type=lambda t: parse_size(t, "--max-ssd-writes"), default=None, metavar="SIZE",
                    help="refuse a run projected to write more than this to the SSD, e.g. 2TB")
    ap.add_argument("--ram-budget", type=lambda t: parse_size(t, "--ram-budget"), default=None, help="RAM for resident blocks and saved inputs, e.g. 8G (default: half of free memory)")
    ap.add_argument("--io-depth", type=int, default=1, help="units read ahead (and writes pending) beside the one computing; a read waits for the writes before it")
    ap.add_argument("--prompt", help="print this prompt's continuation before and after training")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="every N steps: the held-out loss (with --val-data or --val-fraction) and the prompt's continuation")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=0, help="export a checkpoint to <out>/checkpoints every N steps")
    ap.add_argument("--export-dtype", choices=list(DTYPE_NAMES), default=None, help="default: the source's (bf16 for Meta's)")
    ap.add_argument("--lora-rank", type=int, default=None, metavar="R",
                    help="train LoRA adapters of rank R (AdamW, in RAM) instead of every weight: the base is never written")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA's scale is alpha / rank (default: 2 x rank)")
    ap.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    ap.add_argument("--lora-targets", default=None, help=f"comma-separated, of {','.join(LORA_TARGETS)} (default: all)")
    ap.add_argument("--export-adapters", action="store_true",
                    help="with LoRA: also write the adapters alone, in PEFT's layout, to <out>/adapters")
    ap.add_argument("--rank-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="under torchrun: how long a rank waits for the others before it gives up (default 1800)")
    ap.add_argument("--fingerprint-every", type=int, default=10, metavar="N",
                    help="under torchrun: every N steps, check that every rank's weights are still the same (0: never)")
    ap.add_argument("--export-format", default=None, help=f"{' or '.join(FORMATS)} (default: the source's)")
    ap.add_argument("--export-shards", type=int, default=None, help="Meta's format: files (default: the source's count)")
    ap.add_argument("--max-shard-size", type=lambda t: parse_size(t, "--max-shard-size"), default=None,
                    help="Hugging Face's format: bytes per safetensors file (default 5GB)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked flag by flag (what needs the model, in check_inputs)."""
    a = build_parser().parse_args(argv)
    if a.demo and a.model is not None:
        raise SlowftError(f"--demo: trains a tiny model it makes itself; expected no model folder (got {a.model})")
    if a.resume and a.reset_workdir:
        raise SlowftError("--resume --reset-workdir: one continues the unfinished run, the other discards it; expected one of them")
    a.demo = a.demo or a.model is None
    check_lora_flags(a, argv if argv is not None else sys.argv[1:])
    if a.demo:
        demo_defaults(a, argv if argv is not None else sys.argv[1:])
    if a.lr is None:
        a.lr = LORA_LR if a.lora_rank else DEFAULT_LR[a.optimizer]
    check_optimizer_flags(a)
    for flag, value, ok, want in [
        ("--steps", a.steps, a.steps > 0, "a positive integer"),
        ("--batch-size", a.batch_size, a.batch_size > 0, "a positive integer"),
        ("--grad-accum", a.grad_accum, a.grad_accum > 0, "a positive integer"),
        ("--lisa", a.lisa, a.lisa >= 0, "a positive number of blocks"),
        ("--seq-len", a.seq_len, a.seq_len > 0, "a positive integer"),
        ("--lr", a.lr, 0 < a.lr < math.inf, "a positive number"),
        ("--min-lr", a.min_lr, 0 <= a.min_lr <= a.lr, "a number in [0, --lr]"),
        ("--warmup-steps", a.warmup_steps, 0 <= a.warmup_steps <= a.steps, "an integer in [0, --steps]"),
        ("--dropout", a.dropout, 0 <= a.dropout < 1, "a number in [0, 1)"),
        ("--eval-every", a.eval_every, a.eval_every >= 0, "an integer >= 0"),
        ("--save-every", a.save_every, a.save_every >= 0, "an integer >= 0"),
        ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens > 0, "a positive integer"),
        ("--io-depth", a.io_depth, 1 <= a.io_depth <= 8, "an integer from 1 to 8"),
        ("--rank-timeout", a.rank_timeout, 0 < a.rank_timeout < math.inf, "a positive number of seconds"),
        ("--fingerprint-every", a.fingerprint_every, a.fingerprint_every >= 0, "an integer >= 0"),
        ("--export-shards", a.export_shards, a.export_shards is None or a.export_shards > 0, "a positive integer"),
    ]:
        if not ok:
            raise SlowftError(f"{flag} {value}: expected {want}")
    if a.val_data and a.val_fraction is not None:
        raise SlowftError("--val-data --val-fraction: one holds out other files, the other part of --data; expected one of them")
    if a.val_fraction is not None and not 0 < a.val_fraction <= 0.5:
        raise SlowftError(f"--val-fraction {a.val_fraction}: expected a number in (0, 0.5]")
    if a.lisa and a.train_layers:
        raise SlowftError(f"--lisa {a.lisa} --train-layers {a.train_layers}: LISA samples the blocks itself; expected one of them")
    if a.train_layers is not None:
        a.train_layers = parse_layers(a.train_layers)
    world = world_size()
    if a.grad_accum % world:
        raise SlowftError(f"--grad-accum {a.grad_accum}: each of the {world} ranks takes an equal share of a step's "
                          f"micro-batches; expected a multiple of {world}")
    return a


def check_optimizer_flags(a) -> None:
    """The optimizer's own flags, in the command line's terms (the library would name its arguments)."""
    takes = {"sgd": {"weight_decay"}, "adalite": set(), "adalomo": {"weight_decay"},
             "adamw": {"weight_decay", "betas", "optim_state_dtype"}}[a.optimizer]
    for key in ("weight_decay", "betas", "optim_state_dtype"):
        value = getattr(a, key)
        if value is not None and key not in takes:
            flag = "--" + key.replace("_", "-")
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise SlowftError(f"{flag} {shown}: --optimizer {a.optimizer} has no such setting; expected it with "
                              + ("--optimizer adamw" if key != "weight_decay" else "--optimizer sgd, adalomo or adamw"))
    if a.weight_decay is not None and not 0 <= a.weight_decay < math.inf:
        raise SlowftError(f"--weight-decay {a.weight_decay}: expected a number >= 0")
    if a.betas is not None and not all(0 <= b < 1 for b in a.betas):
        raise SlowftError(f"--betas {a.betas[0]} {a.betas[1]}: expected two numbers in [0, 1)")


def check_lora_flags(a, argv: list[str]) -> None:
    """LoRA's flags: its adapters train with AdamW, so --optimizer is adamw (or not given)."""
    lora_flags = [f for f in ("--lora-alpha", "--lora-dropout", "--lora-targets", "--export-adapters") if f in argv]
    if a.lora_rank is None:
        if lora_flags:
            raise SlowftError(f"{lora_flags[0]}: a LoRA setting; expected it with --lora-rank")
        return
    if a.lora_rank <= 0:
        raise SlowftError(f"--lora-rank {a.lora_rank}: expected a positive integer")
    subset = next((f for f, on in (("--train-layers", a.train_layers), ("--lisa", a.lisa), ("--freeze-embeddings", a.freeze_embeddings),
                                    ("--freeze-head", a.freeze_head)) if on), None)
    if subset:
        raise SlowftError(f"{subset}: chooses what a full fine-tune trains; LoRA adapts every block and writes no unit")
    if "--optimizer" in argv and a.optimizer != "adamw":
        raise SlowftError(f"--optimizer {a.optimizer}: LoRA's adapters train with AdamW; expected --optimizer adamw or none")
    a.optimizer = "adamw"
    a.lora_alpha = a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora_rank
    a.lora_dropout = a.lora_dropout or 0.0
    if not 0 <= a.lora_dropout < 1:
        raise SlowftError(f"--lora-dropout {a.lora_dropout}: expected a number in [0, 1)")
    a.lora_targets = ",".join(t.strip() for t in (a.lora_targets or ",".join(LORA_TARGETS)).split(","))
    unknown = [t for t in a.lora_targets.split(",") if t not in LORA_TARGETS]
    if unknown:
        raise SlowftError(f"--lora-targets {unknown[0]}: unknown; expected some of {','.join(LORA_TARGETS)}")


def make_run_optimizer(a):
    """The optimizer the flags ask for (the library's defaults where a flag is not given)."""
    return make_optimizer(a.optimizer, a.lr, a.weight_decay, tuple(a.betas) if a.betas else None, None, a.optim_state_dtype)


def parse_layers(text: str) -> str:
    """'A-B' or 'A' -> the canonical 'A-B' (checked against the model's depth later)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise SlowftError(f"--train-layers {text}: expected a range such as 20-39 (inclusive, 0-based)") from None
    if not 0 <= a <= b:
        raise SlowftError(f"--train-layers {text}: expected A-B with 0 <= A <= B")
    return f"{a}-{b}"


def check_layers(a, n_layers: int) -> None:
    if a.train_layers and int(a.train_layers.split("-")[1]) >= n_layers:
        raise SlowftError(f"--train-layers {a.train_layers}: the model has layers 0-{n_layers - 1}")
    if a.lisa > n_layers:
        raise SlowftError(f"--lisa {a.lisa}: above the model's {n_layers} layers")


def step_subset(a, n_layers: int, step: int) -> dict:
    """model.step's arguments for what the step trains."""
    if a.lisa:
        layers = lisa_layers(a.lisa, n_layers, a.seed, step)
    elif a.train_layers:
        lo, hi = map(int, a.train_layers.split("-"))
        layers = list(range(lo, hi + 1))
    else:
        layers = None
    return {"train_layers": layers, "train_embedding": not a.freeze_embeddings, "train_head": not a.freeze_head}


def demo_defaults(a: argparse.Namespace, argv: list[str]) -> None:
    """The embedded default: a tiny model (built once) and settings that learn test_data/ in under a
    minute, the prose's continuation and chat.jsonl's answers word for word (a question's answer
    comes late: 100 steps of 8 rows miss them all, 120 steps of 16 got them for each of 6 seeds);
    --ram-budget 0 sends every block through the work dir each step, as for a big model."""
    given = {x.split("=")[0] for x in argv if x.startswith("--")}
    a.model = a.model or cache_root() / "demo" / "tiny-llama2"
    try:
        a.model.parent.mkdir(parents=True, exist_ok=True)
        with open(a.model.parent / ".lock", "w") as lock:  # (torchrun's ranks on one machine: built once)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (a.model / "params.json").exists():
                print(f"demo: building a tiny llama2 model in {a.model}")
                make_tiny(a.model, **DEMO)
    except OSError as e:
        raise SlowftError(f"{a.model}: cannot write the demo model ({e.strerror}); expected a writable folder "
                          "(the cache is ~/.cache/slowft, or $SLOWFT_CACHE)") from None
    lr = DEMO_LR[a.optimizer]
    world = world_size()  # under torchrun, the same 16 rows a step, split between the ranks
    ranks_split = world > 1 and 16 % world == 0
    for flag, value in [("--steps", 120), ("--batch-size", 16 // world if ranks_split else 16),
                        ("--grad-accum", world if ranks_split else 1), ("--seq-len", 64), ("--lr", lr), ("--min-lr", lr / 5),
                        ("--warmup-steps", 3), ("--prompt", DEMO_PROMPT), ("--eval-every", 40), ("--max-new-tokens", 24),
                        ("--device", "cpu"), ("--ram-budget", 0), ("--out", Path("out") / "demo")]:
        if flag not in given:
            setattr(a, flag[2:].replace("-", "_"), value)
    if "--warmup-steps" not in given:  # the demo's own choices give way to a shorter run or a lower --lr
        a.warmup_steps = min(a.warmup_steps, a.steps)
    if "--min-lr" not in given:
        a.min_lr = min(a.min_lr, a.lr)


class StepLog:
    """One JSON line per step in <out>/metrics.jsonl, appended with a single write (a log, not state).
    A new run moves an earlier run's log aside rather than mixing into it; a resumed run appends."""

    def __init__(self, path: Path, resumed: bool, enabled: bool = True):
        self.path, self.enabled = path, enabled  # (with ranks, rank 0's alone)
        if enabled and not resumed and path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            os.replace(path, path.with_name(f"metrics-{stamp}.jsonl"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)


def gb(n: float) -> str:
    """Bytes for people: 1.23 GB, 45.6 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def show_continuation(model, tok, prompt: str, n: int, label: str) -> None:
    text = generate(model, tok, prompt, n)
    print(f"[{label}] {prompt}{text}".rstrip())


def resume_command() -> str:
    if world_size() > 1:
        return "the same torchrun command (every rank resumes)"
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    return " ".join(shlex.quote(x) for x in [Path(sys.executable).name, sys.argv[0], *args])


@dataclass
class Inputs:
    """What the cheap checks found: the device, the model folder, its tokenizer, the data, --out."""

    device: torch.device
    src: object  # a source of slowft.formats
    tok: BaseTokenizer
    data: TokenData
    val: TokenData | None
    out: Path
    export_bytes: int


def main(argv=None) -> int:
    a = parse_args(argv)
    ranks = join_ranks(a)
    try:
        i = check_inputs(a, ranks)
        if ranks is not None:
            ranks.check_same(rank_settings(a, i, ranks), "flags, model and data")
        return train_in_workdir(a, i, ranks)
    except RankLost as e:
        print(f"error: {e}. Every rank's work dir is consistent: run the same torchrun command again to resume.", file=sys.stderr)
        return 4
    except SlowftError as e:
        if ranks is None:
            raise
        raise SlowftError(f"rank {ranks.rank}: {e}") from None
    finally:
        if ranks is not None:
            ranks.close()


def join_ranks(a) -> Ranks | None:
    """Under torchrun: joins the other ranks (this one quiet unless it is rank 0); else None."""
    if world_size() == 1:
        return None
    ranks = Ranks.from_env(pick_device(a.device), a.rank_timeout)
    if not ranks.first:  # rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return ranks


def rank_settings(a, i: "Inputs", ranks: Ranks) -> dict:
    """What every rank must be given alike, by flag: the run's settings, the model, and what
    decides when the ranks act together."""
    settings = {**run_settings(a, i, ranks), "model": folder_digest(i.src.path), "storage_dtype": a.storage_dtype,
                "eval_every": a.eval_every, "fingerprint_every": a.fingerprint_every, "resume": a.resume,
                "reset_workdir": a.reset_workdir}
    named = {"data": "--data (its tokens)", "val": "--val-data (its tokens)", "model": "the model folder (its files)",
             "ranks": "WORLD_SIZE"}
    return {named.get(k, "--" + k.replace("_", "-")): v for k, v in settings.items()}


def train_in_workdir(a, i: "Inputs", ranks: Ranks | None) -> int:
    """The work dir (with ranks, each its own: a per-rank folder), the model in it, and the run."""
    workdir = workdir_path(i.src, a.workdir, a.storage_dtype) / f"rank-{ranks.rank}" if ranks is not None else a.workdir
    store = open_workdir(i.src, workdir, a.storage_dtype, a.reset_workdir)
    model = None
    try:
        resumed = start_or_resume(store, a, i, ranks)
        if ranks is not None:
            ranks.agree_on_journal(store)
        model = OffloadedModel(store, i.device, a.compute_dtype, a.ram_budget, a.io_depth, rounding=a.rounding, ranks=ranks)
        model.fingerprint_every = a.fingerprint_every
        if a.lora_rank:  # (its settings checked in check_inputs; the work dir's, by the run's settings)
            model.enable_lora(a.lora_rank, a.lora_alpha, a.lora_targets.split(","), a.lora_dropout, a.seed)
        writes = WritePlan(model.layout(), a, i.export_bytes, model.step_count)
        print(plan_summary(model, a, i.out, writes))
        check_disk(model, a, i.out)
        return train(model, a, i.tok, i.data, i.val, i.out, resumed, writes)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise SlowftError(
            f"{store.root}: disk full while writing; nothing was lost. Free some space, then run: {resume_command()}"
        ) from None
    finally:
        if model is not None:
            try:
                model.close()
            except (OSError, RankLost):
                pass
        store.close()


def check_inputs(a, ranks: Ranks | None = None) -> Inputs:
    """Everything that can be checked before anything is written: a mistake fails in the first
    second, not after an hour of importing. Only --out is created (and probed)."""
    device = ranks.device if ranks is not None else pick_device(a.device)
    src = open_source(a.model)
    export_format = a.export_format or src.format
    writer(export_format, "--export-format")  # (refuses a format slowft has no writer for)
    if a.seq_len > src.args.max_seq_len:
        raise SlowftError(f"--seq-len {a.seq_len}: above the model's limit of {src.args.max_seq_len}")
    check_layers(a, src.args.n_layers)
    if a.lora_rank:
        try:
            check_lora(src.args, a.lora_rank, a.lora_targets.split(","))
        except ValueError as e:
            raise SlowftError(str(e).replace("LoRA rank", "--lora-rank")) from None
    export_bytes = n_params(src.args) * (DTYPE_NAMES[a.export_dtype] if a.export_dtype else src.dtype).itemsize
    budget = default_ram_budget(device) if a.ram_budget is None else a.ram_budget
    WritePlan(Layout.estimate(src.args, DTYPE_NAMES[a.storage_dtype], DTYPE_NAMES[a.compute_dtype], budget), a,
              export_bytes).check_budget(a.max_ssd_writes)
    if a.export_shards and export_format != "meta":
        raise SlowftError(f"--export-shards {a.export_shards}: Meta's format's; expected --max-shard-size for {export_format}")
    if a.max_shard_size is not None and export_format != "hf":
        raise SlowftError(f"--max-shard-size: Hugging Face's format's; expected --export-shards for {export_format}")
    if a.export_shards:  # here, not after a night of training
        keys = src.key_order if src.format == "meta" else meta_format.key_order(src.args)
        meta_format.check_split(expected_shapes(src.args), keys, a.export_shards, "--export-shards")
    tok = src.tok
    data, val = held_out(a, tok)
    out = (a.out or Path("out") / src.path.name).expanduser().resolve()
    if out == src.path or src.path in out.parents:
        raise SlowftError(f"--out {out}: is inside the source model folder {src.path}; expected a folder elsewhere")
    if out / "checkpoints" in src.path.parents:  # old checkpoints are deleted
        raise SlowftError(f"--out {out}: holds the source model folder {src.path} among its checkpoints; expected a folder elsewhere")
    check_export_path(out / "model", src.path, workdir_path(src, a.workdir, a.storage_dtype))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SlowftError(f"--out {out}: not writable ({e.strerror}); expected a writable folder") from None
    return Inputs(device, src, tok, data, val, out, export_bytes)


def held_out(a, tok: BaseTokenizer) -> tuple[TokenData, TokenData | None]:
    """(training data, held-out data or None): --val-data, or --val-fraction of --data's documents."""
    data = TokenData.from_files(a.data, tok, train_on_prompt=a.train_on_prompt)
    val = None
    if a.val_fraction is not None:
        data, val = data.split(a.val_fraction, a.seed)
    elif a.val_data:
        val = TokenData.from_files(a.val_data, tok, flag="--val-data", train_on_prompt=a.train_on_prompt)
    data.check(a.seq_len)
    if val is not None:
        val.check(a.seq_len)
    if data.examples and data.truncated(a.seq_len):
        print(f"data: {data.truncated(a.seq_len)} of {len(data.lengths)} examples are longer than --seq-len {a.seq_len}; "
              "their ends are cut off")
    return data, val


def run_settings(a, i: Inputs, ranks: Ranks | None) -> dict:
    """The settings an unfinished run resumes with only: RUN_SETTINGS, the data, the ranks."""
    settings = {k: getattr(a, k) for k in RUN_SETTINGS}
    settings["data"] = i.data.fingerprint()
    settings["val"] = i.val.fingerprint() if i.val is not None else None
    if ranks is not None:
        settings["ranks"] = ranks.world
    return settings


def start_or_resume(store, a, i: Inputs, ranks: Ranks | None = None) -> bool:
    """Resumes the work dir's unfinished run if its settings are these, else imports afresh.
    Returns whether it resumed."""
    settings = run_settings(a, i, ranks)
    meta = store.read_json("meta.json") or {}
    previous = meta.get("run")
    resumed = bool(previous and not previous.get("finished"))
    if ranks is not None and ranks.any(resumed) and previous and previous["settings"] == settings:
        resumed = True  # another rank died before it marked this run finished: it finishes again, with them
    if resumed:
        for k in settings:
            if previous["settings"].get(k) != settings[k]:
                raise SlowftError(
                    f"{store.root}: holds an unfinished run with {k} = {previous['settings'].get(k)} (now {settings[k]}); "
                    "repeat that run's command to resume it, or pass --reset-workdir to start over"
                )
        print(f"resuming the unfinished run in {store.root}")
    else:
        if a.resume:
            raise SlowftError(f"--resume: {store.root} holds no unfinished run; run without --resume to start one")
        if previous:
            print(f"{store.root} holds an earlier run's weights; re-importing the originals")
            store.reset()
    import_model(i.src, store, DTYPE_NAMES[a.storage_dtype], run={"settings": settings, "finished": False})
    return resumed


def rounded(model: OffloadedModel) -> bool:
    """Whether the storage dtype loses bits of the source's weights (bfloat16 from float32 or float16)."""
    return model.meta["storage_dtype"] == "bfloat16" and model.meta["source"]["dtype"] != "bfloat16"


class WritePlan:
    """What the run is projected to write to the SSD, by the step driver's own rules
    (slowft.plan.projected_writes): per step by kind, per trained token, and for the run, with
    the exports. With LISA the blocks differ step to step: the mean of the run's first steps."""

    def __init__(self, layout: Layout, a, export_bytes: int, first_step: int = 0):
        args = layout.args
        self.steps, self.resident = max(0, a.steps - first_step), False
        opt = make_run_optimizer(a)
        samples = range(first_step, first_step + max(1, min(self.steps, 16 if a.lisa else 1)))
        lora = bool(a.lora_rank)
        adapters = lora_journal_bytes(args, a.lora_rank, a.lora_targets.split(",")) if lora else 0
        world = world_size()  # (with ranks, what each rank's share of the step writes to its own SSD)
        per = [projected_writes(layout, opt, plan_step(args.n_layers, a.batch_size * a.grad_accum // world, a.batch_size,
                                                       **step_subset(a, args.n_layers, t), lora=lora), a.seq_len, adapters,
                                ranks=world > 1)
               for t in samples]
        self.per_step = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        self.step_bytes = sum(self.per_step.values())
        self.resident = self.step_bytes == 0
        self.units = sum(layout.unit_bytes.values())
        self.tokens = a.grad_accum * a.batch_size * a.seq_len
        self.exports = export_bytes * (1 + (self.steps // a.save_every if a.save_every else 0))
        self.total = self.step_bytes * self.steps + self.exports
        trainable = plan_step(args.n_layers, 1, **{**step_subset(a, args.n_layers, first_step),
                                                  **({"train_layers": None} if a.lisa else {})}, lora=lora).trained
        self.state = sum(state_bytes(opt, shape) for unit, shapes in unit_shapes(args).items() if unit in trainable
                         for shape in shapes.values())

    def lines(self) -> list[str]:
        if self.resident:
            return [f"SSD     the model stays in RAM: {gb(self.units)} written at each sync (every {SYNC_EVERY_S / 60:.0f} min), "
                    f"and {gb(self.exports)} of exports"]
        kinds = ", ".join(f"{k} {gb(v)}" for k, v in self.per_step.items() if v)
        return [f"SSD     writes ~{gb(self.step_bytes)} per step ({kinds}): {self.step_bytes / self.tokens / 1e6:.2f} MB "
                f"per trained token; ~{gb(self.total)} for this run with {gb(self.exports)} of exports"]

    def check_budget(self, limit: int | None) -> None:
        if limit is not None and self.total > limit:
            raise SlowftError(
                f"--max-ssd-writes {gb(limit)}: this run is projected to write {gb(self.total)} "
                f"({self.step_bytes / self.tokens / 1e6:.2f} MB per trained token); bring it under with a larger --grad-accum "
                "(more tokens per weight write), --storage-dtype bfloat16, --train-layers or --lisa (fewer blocks written), "
                "or a larger --ram-budget (activations kept in RAM), or fewer --steps")


def plan_summary(model: OffloadedModel, a, out: Path, writes: WritePlan) -> str:
    m, args = model, model.args
    units = sum(m.unit_bytes.values())
    mode = "all blocks resident in RAM" if m.cache.resident else (
        "streaming blocks from SSD " + ("(direct, bypassing the page cache)" if m.store.direct else "(through the page cache, which holds them)"))
    subset = (f", {a.lisa} sampled blocks a step (LISA)" if a.lisa else f", blocks {a.train_layers} only" if a.train_layers else "") \
        + (", embedding frozen" if a.freeze_embeddings else "") + (", head frozen" if a.freeze_head else "")
    return "\n".join([
        f"model   {m.meta['source']['path']}: {m.n_params() / 1e6:,.1f}M parameters, {args.n_layers} layers, dim {args.dim}",
        f"workdir {m.store.root} ({gb(units)} of {m.meta['storage_dtype']} weights"
        + (f", rounded from the source's {m.meta['source']['dtype']}" if rounded(m) else "")
        + (f", updates rounded {a.rounding}" if m.meta["storage_dtype"] == "bfloat16" else "") + ")",
        f"memory  RAM budget {gb(m.ram_budget)}: {mode}; device {m.device}, compute {a.compute_dtype}",
        f"train   {a.steps} steps x {a.grad_accum} micro-batches x {a.batch_size} x {a.seq_len} tokens "
        f"({writes.tokens:,} a step), {a.optimizer} lr {a.lr:g} ({a.schedule}, state {gb(writes.state)} in the work dir)"
        f"{subset}, from step {m.step_count}",
        *writes.lines(),
        *ranks_line(model, a),
        f"out     {out}",
    ])


def ranks_line(model: OffloadedModel, a) -> list[str]:
    """With ranks: how the step is split, and what crosses the network."""
    r, args = model.ranks, model.args
    if r is None:
        return []
    plan = plan_step(args.n_layers, 1, **step_subset(a, args.n_layers, model.step_count), lora=model.lora is not None)
    lora = sum(p.numel() for p in model.lora.params()) if model.lora is not None else 0
    return [f"ranks   {r.world} (torchrun): each takes {a.grad_accum // r.world} of a step's {a.grad_accum} micro-batches "
            f"and all-reduces ~{gb(reduced_bytes(args, plan, lora))} of gradients a step; rank 0 logs and exports"]


def check_disk(model: OffloadedModel, a, out: Path) -> None:
    """Training needs room for the new versions of units written before a journal commit lets the
    old ones go (all of them at a resident model's sync; a few while streaming, plus the spare
    files they are written into, see slowft.store), spilled inputs and the export."""
    args = model.args
    export_bytes = model.n_params() * DTYPE_NAMES[a.export_dtype or model.meta["source"]["dtype"]].itemsize
    x_bytes = a.batch_size * a.seq_len * args.dim * model.compute_dtype.itemsize
    units = model.unit_bytes.values()
    work_bytes = sum(units) if model.cache.resident else 8 * max(units) + 2 * (args.n_layers + 1) * a.grad_accum * x_bytes
    free_work, free_out = model.store.free_bytes(), os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    same_disk = os.stat(out).st_dev == os.stat(model.store.root).st_dev
    if same_disk and work_bytes + export_bytes > free_work:
        raise SlowftError(f"{model.store.root}: training and export need {gb(work_bytes + export_bytes)}, only {gb(free_work)} free")
    if not same_disk and (work_bytes > free_work or export_bytes > free_out):
        raise SlowftError(f"disk space: work dir needs {gb(work_bytes)} ({gb(free_work)} free), --out needs {gb(export_bytes)} ({gb(free_out)} free)")


class RunMeter:
    """What the run has done: steps, time, bytes moved (the store's counters) and losses; each
    step's line and metrics.jsonl record, and the summary at the end, where the bytes written
    are set against the projection."""

    def __init__(self, model: OffloadedModel, a, log: StepLog, writes: WritePlan):
        self.model, self.a, self.log, self.writes = model, a, log, writes
        self.bar: RunBar | None = None  # the run's bar on a terminal, while steps run
        self.started, self.io_start, self.waited_start = time.perf_counter(), model.store.stats.snapshot(), model.io.waited
        self.reduced = (model.ranks.reduced_bytes, model.ranks.reduce_s) if model.ranks is not None else None
        self.io_before, self.lowest = self.io_start, math.inf
        self.stepping, self.steps_run, self.first_loss, self.loss = 0.0, 0, None, None

    def begin(self) -> None:
        self.wait_before, self.t0 = self.model.io.waited, time.perf_counter()

    def end(self, step: int, loss: float, lr: float, n_tokens: int) -> None:
        m, stats = self.model, self.model.store.stats
        dt = time.perf_counter() - self.t0
        waited = m.io.waited - self.wait_before
        self.stepping, self.steps_run, self.loss = self.stepping + dt, self.steps_run + 1, loss
        self.lowest = min(self.lowest, loss)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        now = stats.snapshot()  # bytes since the last step's line: write-behind finishing between steps counts too
        io, self.io_before = stats.delta(now, self.io_before), now
        read, written = sum(io["read"].values()), sum(io["written"].values())
        total_written = sum(stats.delta(now, self.io_start)["written"].values())
        if self.bar is not None and self.bar.active:  # a terminal: the run's bar; the lines below are for logs
            self.bar.step(f"loss {loss:.4f}, {n_tokens / dt:,.0f} tok/s, SSD written {gb(total_written)}")
        else:
            print(f"step {step:>5}/{self.a.steps}  loss {loss:.4f}  lr {lr:.2e}  {n_tokens / dt:,.0f} tok/s  {dt:.2f} s "
                  f"(SSD wait {waited:.2f} s)  read {gb(read)}  wrote {gb(written)} (run: {gb(total_written)})", flush=True)
        record = {"step": step, "loss": loss, "lr": lr, "tokens": n_tokens, "tokens_per_s": n_tokens / dt,
                  "step_s": dt, "io_wait_s": waited, "read_bytes": io["read"], "written_bytes": io["written"],
                  "written_total_bytes": total_written}
        if m.ranks is not None:  # (rank 0's: every rank sums the same gradients; the seconds include waiting for the others)
            now_reduced = (m.ranks.reduced_bytes, m.ranks.reduce_s)
            record["reduced_bytes"], record["reduce_s"] = now_reduced[0] - self.reduced[0], now_reduced[1] - self.reduced[1]
            self.reduced = now_reduced
        self.log.write(record)

    def summary(self) -> None:
        if self.loss is None:
            return
        m, took = self.model, time.perf_counter() - self.started
        total = m.store.stats.delta(m.store.stats.snapshot(), self.io_start)
        read, written = sum(total["read"].values()), sum(total["written"].values())
        kinds = lambda d: ", ".join(f"{k} {gb(v)}" for k, v in d.items() if v)  # noqa: E731
        print(f"done: loss {self.first_loss:.4f} -> {self.loss:.4f} in {took:.0f} s\n"
              f"SSD read {gb(read)} ({gb(read / took)}/s: {kinds(total['read'])}), "
              f"wrote {gb(written)} ({gb(written / took)}/s: {kinds(total['written'])}) in this run; "
              f"the steps waited for it {m.io.waited - self.waited_start:.1f} s of {self.stepping:.1f} s")
        if not self.writes.resident:
            projected = self.writes.step_bytes * self.steps_run
            print(f"SSD writes: {gb(written)} measured against {gb(projected)} projected for {self.steps_run} steps "
                  f"({written / projected - 1:+.1%}), {written / (self.steps_run * self.writes.tokens) / 1e6:.2f} MB per trained token")


class HeldOut:
    """The held-out loss: a forward only (units are read, none written) over the held-out text's
    windows, or, where it holds JSONL examples, its spans packed into rows, each example whole and
    scored as if alone, as training packs them; logged to the console and metrics.jsonl, the loss
    plot redrawn after each."""

    def __init__(self, model: OffloadedModel, val: TokenData, a, log: StepLog, out: Path):
        self.model, self.log, self.out, self.batch = model, log, out, a.batch_size
        self.x, self.y, self.segments = val.packed_rows(a.seq_len) if val.examples else (*val.windows(a.seq_len), None)
        self.last = None

    def evaluate(self, step: int) -> float:
        counted = int((self.y >= 0).sum())
        if self.model.ranks is None:
            loss = mean_loss(self.model.logits, self.x, self.y, self.batch, self.segments)
        else:
            loss = self.loss_sum(self.model.ranks) / max(1, counted)
        self.last = step
        if not speaks(self.model):
            return loss
        ppl = math.exp(min(loss, 50))
        print(f"eval  {step:>5}  held-out loss {loss:.4f}  perplexity {ppl:,.2f}  ({counted:,} tokens)", flush=True)
        self.log.write({"step": step, "eval_loss": loss, "eval_ppl": ppl, "eval_tokens": counted})
        write_loss_plot(self.log.path, self.out / "loss.png", str(self.model.meta["source"]["path"]))
        return loss

    def loss_sum(self, ranks: Ranks) -> float:
        """The held-out targets' summed loss, each rank scoring every world-th batch of rows."""
        mine = torch.arange(len(self.x)).div(self.batch, rounding_mode="floor") % ranks.world == ranks.rank
        x, y, seg = self.x[mine], self.y[mine], self.segments[mine] if self.segments is not None else None
        local = mean_loss(self.model.logits, x, y, self.batch, seg) * max(1, int((y >= 0).sum()))
        return float(ranks.total(torch.tensor([local], dtype=torch.float32)).item())


def speaks(model: OffloadedModel) -> bool:
    """Whether this process prints, logs and exports: alone, or as rank 0."""
    return model.ranks is None or model.ranks.first


def stop_on_signals(model: OffloadedModel) -> None:
    """Ctrl-C or SIGTERM: finish the block in hand, commit, exit 130; a second one aborts at once."""
    def on_signal(signum, frame):
        if model.stop_requested:
            raise KeyboardInterrupt
        model.stop_requested = True
        print("\nstopping after the block in hand (Ctrl-C again to abort at once)...", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def train(model: OffloadedModel, a, tok: BaseTokenizer, data: TokenData, val: TokenData | None, out: Path, resumed: bool,
          writes: WritePlan) -> int:
    schedule = cosine_with_warmup(a.lr, a.steps, a.warmup_steps, a.min_lr) if a.schedule == "cosine" else constant_lr(a.lr)
    optimizer = make_run_optimizer(a)
    log = StepLog(out / "metrics.jsonl", resumed, enabled=speaks(model))
    meter = RunMeter(model, a, log, writes)
    heldout = HeldOut(model, val, a, log, out) if val is not None else None
    stop_on_signals(model)
    try:
        run_steps(model, a, tok, data, out, optimizer, schedule, meter, heldout)
        final = finish(model, a, tok, out, heldout)
    except Interrupted as e:
        print(f"{e}; the work dir is consistent. Resume with:\n  {resume_command()}", file=sys.stderr)
        return 130
    except NonFiniteError as e:
        print(f"error: {e}. The work dir keeps the last good weights; to start over with other settings, "
              "add --reset-workdir.", file=sys.stderr)
        return 3
    except RanksDiverged as e:
        print(f"error: {e}. Start over with --reset-workdir on every rank.", file=sys.stderr)
        return 3
    except Diverged as e:
        print(f"error: {e}. Start over with a lower --lr and --reset-workdir"
              + (f" (the last checkpoint is in {out / 'checkpoints'})" if a.save_every else "") + ".", file=sys.stderr)
        return 3
    meter.summary()
    print(f"exported to {final}\ntry it:  python test_gen.py {shlex.quote(str(final))}" + (f" --prompt {shlex.quote(a.prompt)}" if a.prompt else ""))
    return 0


def check_collapse(loss: float, lowest: float, vocab: int, step: int) -> None:
    """A loss back at exactly ln(vocab) after it had been well below: the model now predicts the
    uniform distribution (its head or norms driven to zero by too large a step). No NaN says so,
    and nothing after it learns: stop rather than spend the night."""
    uniform = math.log(vocab)
    if lowest < uniform - 0.1 and abs(loss - uniform) < 1e-3:
        raise Diverged(f"loss {loss:.4f} at step {step} is ln({vocab}): the model collapsed to a uniform output "
                       f"(its loss had been {lowest:.4f})")


def run_steps(model: OffloadedModel, a, tok: BaseTokenizer, data: TokenData, out: Path, optimizer, schedule, meter: RunMeter,
              heldout: "HeldOut | None") -> None:
    """The steps still to run, each logged; on a terminal one bar for the run."""
    if a.prompt and model.step_count == 0 and speaks(model):
        show_continuation(model, tok, a.prompt, a.max_new_tokens, "before")
    if heldout and model.step_count == 0:
        heldout.evaluate(0)
    done = model.step_count
    if (a.save_every and 0 < done < a.steps and done % a.save_every == 0 and speaks(model)
            and not (out / "checkpoints" / f"step-{done:06d}").exists()):
        save_checkpoint(model, a, out, done)  # the run stopped while writing this checkpoint
    stream = None if speaks(model) else sys.stdout  # (another rank's: nowhere)
    meter.bar = bar = RunBar(a.steps, done, stream)
    progress = model.on_progress = StepProgress(model.args.n_layers, stream, bar=bar)
    try:
        for step in range(done, a.steps):
            optimizer.lr = schedule(step)
            tokens, targets, segments = batch_of(data, a, step)
            meter.begin()
            progress.begin(step + 1)
            loss = model.step(tokens, targets, optimizer, dropout=a.dropout, seed=a.seed, micro_batch_size=a.batch_size,
                              segments=segments, **step_subset(a, model.args.n_layers, step))
            progress.clear()
            meter.end(step + 1, loss, optimizer.lr, tokens.numel())
            check_collapse(loss, meter.lowest, model.args.vocab_size, step + 1)
            between_steps(model, a, tok, out, step + 1, heldout)
    finally:
        bar.close()


def batch_of(data: TokenData, a, step: int):
    """The step's rows: packed spans where the data holds JSONL examples (whole examples, and
    the text documents' pieces: TokenData.spans), else windows of the text's stream."""
    rows = a.batch_size * a.grad_accum
    if data.examples:
        return data.packed_batch(step, rows, a.seq_len, a.seed)
    return (*data.batch(step, rows, a.seq_len, a.seed), None)


def between_steps(model: OffloadedModel, a, tok: BaseTokenizer, out: Path, done: int, heldout: "HeldOut | None") -> None:
    """After step ``done``: the held-out loss and the prompt's continuation, a checkpoint, or a
    requested stop."""
    if a.eval_every and done % a.eval_every == 0 and done < a.steps:
        if heldout:
            heldout.evaluate(done)
        if a.prompt and speaks(model):
            show_continuation(model, tok, a.prompt, a.max_new_tokens, f"step {done}")
    if a.save_every and done % a.save_every == 0 and done < a.steps and speaks(model):
        save_checkpoint(model, a, out, done)
    if model.should_stop():
        model.sync()
        raise Interrupted(f"stopped after step {done}")


def finish(model: OffloadedModel, a, tok: BaseTokenizer, out: Path, heldout: "HeldOut | None") -> Path | None:
    """The weights made durable, the last evaluation and continuation, the export (with ranks,
    rank 0's; None on the others), and the run marked finished."""
    model.sync()
    if heldout and heldout.last != a.steps:
        heldout.evaluate(a.steps)  # (redraws the plot)
    elif speaks(model):
        write_loss_plot(out / "metrics.jsonl", out / "loss.png", str(model.meta["source"]["path"]))
    final = None
    if speaks(model):
        if a.prompt:
            show_continuation(model, tok, a.prompt, a.max_new_tokens, "after")
        final = export(model, a, out / "model")
        if a.export_adapters:
            print(f"adapters: {model.save_adapters(out / 'adapters')} (PEFT's layout)")
    if model.ranks is not None:  # a rank's run is finished once rank 0 has exported (until then, it resumes)
        model.ranks.barrier()
    faults.hit("finish")
    meta = model.store.read_json("meta.json")
    meta["run"]["finished"] = True
    model.store.write_json("meta.json", meta)
    return final


def export(model: OffloadedModel, a, path: Path) -> Path:
    """model.save, where a full disk is named as the export's: the work dir is intact and the run resumes."""
    try:
        return model.save(path, a.export_format, a.export_dtype, a.export_shards, a.max_shard_size)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise SlowftError(f"--out {path}: disk full while exporting; the trained weights are safe in "
                          f"{model.store.root}. Free some space, then run: {resume_command()}") from None


def save_checkpoint(model: OffloadedModel, a, out: Path, step: int) -> None:
    """Keeps only the newest checkpoint: each is as large as the model."""
    root = out / "checkpoints"
    path = export(model, a, root / f"step-{step:06d}")
    for old in root.glob("step-*"):
        if old != path and old.is_dir() and foreign_file(old) is None:  # only what an export wrote
            shutil.rmtree(old)
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    run(main)
