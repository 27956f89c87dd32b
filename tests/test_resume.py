"""Overnight safety: a run killed at any moment resumes to bit-identical weights.

Each crash is a real SIGKILL of the training process, fired from inside it at the n-th pass
through a named point (slowft.faults), so every phase is hit deterministically: import, the
forward, the backward between unit updates, a unit's file write, the journal, the export.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_script, tree_hash
from slowft.store import read_safetensors
from test_loader import bits

TRAIN = ["--steps", 8, "--batch-size", 2, "--grad-accum", 1, "--seq-len", 16, "--optimizer", "adalite", "--lr", 1e-3,
         "--dropout", 0.1, "--seed", 5, "--device", "cpu", "--save-every", 3]


@pytest.fixture(scope="module")
def src(tiny):
    return tiny(dim=64, layers=3, heads=4, kv_heads=2, shards=2)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """The uninterrupted run's export."""
    d = tmp_path_factory.mktemp("ref")
    r = run_script("finetune.py", src, *TRAIN, "--ram-budget", 0, "--out", d / "out", "--workdir", d / "w")
    assert r.returncode == 0, r.stderr
    return bits(d / "out" / "model")


def crash_chain(src, tmp_path, faults, budget):
    """Runs the same command once per fault (each killed there, then resumed), then to the end."""
    args = [src, *TRAIN, "--ram-budget", budget, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    for i, fault in enumerate(faults):
        r = run_script("finetune.py", *args, *(["--resume"] if i else []), env={"SLOWFT_FAULT": fault})
        assert r.returncode == -9, f"{fault} was not reached: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    r = run_script("finetune.py", *args)  # no --resume: an unfinished run is detected and continued
    assert r.returncode == 0, r.stderr
    assert "resuming the unfinished run" in r.stdout
    return r


def test_sigkill_anywhere_then_resume_is_bit_identical(src, reference, tmp_path):
    before = tree_hash(src)
    faults = [
        "import_unit:3:kill",          # importing: 2 of 5 units written
        "forward_block:2:kill",        # forward of step 1
        "backward_unit:3:kill",        # backward, 2 units of step 1 updated
        "unit_write_data:2:kill",      # a unit's new file written, not yet renamed
        "journal:2:kill",              # about to commit the journal
        "scratch_write_data:4:kill",   # spilling a saved input
        "unit_write_data:7:kill",      # overwriting a spare file (the 2nd step of this process)
        "export_unit:2:kill",          # inside a checkpoint export
        "export_unit:4:kill",          # inside the final export
    ]
    crash_chain(src, tmp_path, faults, budget=0)
    assert bits(tmp_path / "out" / "model") == reference
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp folders left
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-000006"]
    assert tree_hash(src) == before
    leftovers = [p.name for p in (tmp_path / "w" / "units").iterdir() if not p.name.endswith(".v000008.safetensors")]
    assert not leftovers and not list((tmp_path / "w" / "scratch").iterdir())


def killed_then_resumed(src, tmp_path, train: list, faults: list[str]) -> Path:
    """``train`` run once uninterrupted (into ``tmp_path/ref``), and once killed at each fault in
    turn, then to its end (into ``tmp_path``): the two exports are bit-identical. Returns ref."""
    ref = tmp_path / "ref"
    r = run_script("finetune.py", src, *train, "--out", ref / "out", "--workdir", ref / "w")
    assert r.returncode == 0, r.stderr
    args = [src, *train, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    for i, fault in enumerate(faults):
        r = run_script("finetune.py", *args, *(["--resume"] if i else []), env={"SLOWFT_FAULT": fault})
        assert r.returncode == -9, f"{fault} was not reached: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    r = run_script("finetune.py", *args)
    assert r.returncode == 0, r.stderr
    assert bits(tmp_path / "out" / "model") == bits(ref / "out" / "model")
    return ref


ACCUM = ["--steps", 4, "--batch-size", 1, "--grad-accum", 3, "--seq-len", 16, "--optimizer", "adalite", "--lr", 1e-3,
         "--dropout", 0.1, "--seed", 5, "--device", "cpu", "--lisa", 2, "--save-every", 3]


def test_sigkill_inside_accumulated_steps_is_bit_identical(src, tmp_path):
    """Three micro-batches a step, two LISA blocks, dropout, bf16 storage with stochastic rounding:
    killed between micro-batches, while spilling activations and gradients, between commits."""
    killed_then_resumed(src, tmp_path, [*ACCUM, "--ram-budget", 0],
                        ["backward_micro:4:kill", "scratch_write_data:9:kill", "journal:3:kill"])
    assert not list((tmp_path / "w" / "scratch").iterdir())


@pytest.mark.parametrize("optimizer", [["--optimizer", "adamw", "--optim-state-dtype", "bfloat16"], ["--optimizer", "adalomo"]],
                         ids=["adamw-bf16-state", "adalomo"])
def test_every_optimizer_resumes_bit_identically(src, tmp_path, optimizer):
    """Two micro-batches a step, blocks 1-2 only, killed between micro-batches inside a step."""
    train = ["--steps", 3, "--batch-size", 1, "--grad-accum", 2, "--seq-len", 16, "--lr", 1e-3, "--seed", 5,
             "--device", "cpu", "--train-layers", "1-2", "--ram-budget", 0, *optimizer]
    killed_then_resumed(src, tmp_path, train, ["backward_micro:3:kill"])


def test_lora_resumes_bit_identically_after_a_kill(src, tmp_path):
    """LoRA with adapter dropout, killed at the journal (the step's adapters' file written, not yet
    named): the base is never written, and the adapters come back bit for bit. (Killed inside a
    step, a LoRA step is re-run whole: as any step before its first commit, above.)"""
    train = ["--steps", 3, "--batch-size", 1, "--grad-accum", 2, "--seq-len", 16, "--lr", 1e-2, "--seed", 5,
             "--device", "cpu", "--ram-budget", 0, "--lora-rank", 2, "--lora-dropout", 0.1, "--export-adapters"]
    ref = killed_then_resumed(src, tmp_path, train, ["journal:2:kill"])
    assert tree_hash(tmp_path / "out" / "adapters") == tree_hash(ref / "out" / "adapters")
    units = sorted(p.name for p in (tmp_path / "w" / "units").iterdir())
    assert units and all(".v000000." in u for u in units)  # the base: never a new version


def test_sigkill_with_everything_resident_is_bit_identical(src, reference, tmp_path):
    crash_chain(src, tmp_path, ["backward_unit:9:kill", "export_unit:3:kill"], budget="1G")
    assert bits(tmp_path / "out" / "model") == reference


@pytest.mark.parametrize("budget", [0, "1G"], ids=["streaming", "resident"])
def test_ctrl_c_stops_cleanly_and_resumes(src, reference, tmp_path, budget):
    args = [src, *TRAIN, "--ram-budget", budget, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    r = run_script("finetune.py", *args, env={"SLOWFT_FAULT": "backward_unit:8:sigint"})
    assert r.returncode == 130, r.stderr
    assert "stopped at step 2 with 3 of 5 units updated" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    journal = json.loads((tmp_path / "w" / "journal.json").read_text())
    assert journal["step"] == 1 and journal["sweep"]["done"] == 3  # the block in hand was finished and committed
    r = run_script("finetune.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert bits(tmp_path / "out" / "model") == reference


def test_disk_full_during_block_write(src, reference, tmp_path):
    args = [src, *TRAIN, "--ram-budget", 0, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    r = run_script("finetune.py", *args, env={"SLOWFT_FAULT": "unit_write_data:7:enospc"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "disk full" in lines[0] and "--resume" in lines[0], r.stderr
    assert not list((tmp_path / "w" / "units").glob(".*.tmp"))  # no half-written file left
    journal = json.loads((tmp_path / "w" / "journal.json").read_text())
    for unit, version in journal["versions"].items():  # the journal names complete files
        assert (tmp_path / "w" / "units" / f"{unit}.v{version:06d}.safetensors").is_file()
    r = run_script("finetune.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert bits(tmp_path / "out" / "model") == reference


def test_disk_full_during_export_names_out_and_resumes_to_the_export(src, reference, tmp_path):
    args = [src, *TRAIN, "--ram-budget", 0, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    r = run_script("finetune.py", *args, env={"SLOWFT_FAULT": "export_unit:4:enospc"})  # step 3's checkpoint
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "disk full while exporting" in lines[0] and "--resume" in lines[0], r.stderr
    r = run_script("finetune.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert bits(tmp_path / "out" / "model") == reference


def test_nan_loss_stops_before_any_write(src, tmp_path):
    args = [src, "--steps", 3, "--batch-size", 2, "--seq-len", 16, "--optimizer", "sgd", "--lr", 1e30,
            "--device", "cpu", "--ram-budget", 0, "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    r = run_script("finetune.py", *args)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Try a lower --lr" in r.stderr and "Traceback" not in r.stderr
    journal = json.loads((tmp_path / "w" / "journal.json").read_text())
    assert journal["step"] == 1  # step 1's (finite) update is kept; step 2 wrote nothing
    for unit, version in journal["versions"].items():
        tensors, _ = read_safetensors(tmp_path / "w" / "units" / f"{unit}.v{version:06d}.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), unit


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("ram_budget", [0, 10**9], ids=["streaming", "resident"])
def test_a_step_stopped_by_a_non_finite_gradient_leaves_the_work_dir_to_reopen(src, tmp_path, ram_budget):
    """Python API: units above the bad one are updated in memory, the bad one is dropped (with
    any updates it held in RAM): the model refuses to go on or sync from that, and the work dir,
    reopened, is its last durable state."""
    import slowft
    from slowft.offloaded import OffloadedModel
    from slowft.store import Store

    slowft.load(src, workdir=tmp_path / "w", device="cpu", progress=False).close()
    model = OffloadedModel(Store(tmp_path / "w"), torch.device("cpu"), ram_budget=ram_budget)
    block_fn, recomputes = model.block_fn, []

    def poisoned(w, x, *args, **kwargs):  # the bottom block's gradient at step 2 is NaN
        out = block_fn(w, x, *args, **kwargs)
        if torch.is_grad_enabled() and model.step_count == 1:
            recomputes.append(1)
            if len(recomputes) == model.args.n_layers:  # (a recompute: split, short of the FFN's gate)
                h, *ffn = out
                return _NaNGradient.apply(h), *ffn
        return out

    model.block_fn = poisoned
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    model.step(tokens, tokens, slowft.SGD(lr=0.1))
    with pytest.raises(slowft.NonFiniteError, match="non-finite gradient in layers.0"):
        model.step(tokens, tokens, slowft.SGD(lr=0.1))
    for go_on in (lambda: model.step(tokens, tokens, slowft.SGD(lr=0.1)), model.sync, lambda: dict(model.named_tensors()),
                  lambda: model.logits(tokens)):
        with pytest.raises(slowft.SlowftError, match="stopped part-way .* open it again"):
            go_on()
    model.close()
    with OffloadedModel(Store(tmp_path / "w"), torch.device("cpu"), ram_budget=ram_budget) as again:
        assert again.step_count == (1 if ram_budget == 0 else 0)  # resident: the last sync was the import
        again.step(tokens, tokens, slowft.SGD(lr=0.1))


def test_stop_between_forward_and_backward_leaves_the_model_usable(src, tmp_path):
    """Python API: a stop requested while the top block's forward keeps its graph, honoured before
    any update, hands that block back to the cache; the step then reruns to the same weights."""
    import slowft

    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))

    def train(model, stop_at=None):
        block_fn, calls = model.block_fn, []

        def spy(w, x, *args, **kwargs):
            calls.append(torch.is_grad_enabled())
            if stop_at == model.step_count and calls[-1] and len(calls) == model.args.n_layers:
                model.stop_requested = True  # the top block's forward: the only one with autograd
            return block_fn(w, x, *args, **kwargs)

        model.block_fn = spy
        opt = slowft.Adalite(lr=1e-3)
        for _ in range(3):
            calls.clear()
            try:
                model.step(tokens, tokens, opt, dropout=0.1, seed=2)
            except slowft.Interrupted:
                top = model.cache.entries.get(f"layers.{model.args.n_layers - 1}")
                assert top is None or top.pins == 0
                model.stop_requested, stop_at = False, None
                model.step(tokens, tokens, opt, dropout=0.1, seed=2)
        model.sync()
        return dict(model.named_tensors())

    with slowft.load(src, workdir=tmp_path / "a", device="cpu", ram_budget=0, progress=False) as model:
        want = train(model)
    with slowft.load(src, workdir=tmp_path / "b", device="cpu", ram_budget=0, progress=False) as model:
        got = train(model, stop_at=1)
        assert model.step_count == 3
    assert all(torch.equal(got[k], want[k]) for k in want)
