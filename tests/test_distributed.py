"""Data-parallel over torch.distributed: two gloo ranks on localhost, each a finetune.py process
started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that one
rank can be killed or given other flags than the other."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

import finetune
from conftest import ROOT, tree_hash
from reference import RefLlama, load_meta
from slowft import cli
from slowft.formats import open_source
from slowft.plan import plan_step, reduced_bytes
from test_loader import bits
from test_train import reference_grads

STEPS = ["--steps", 3, "--batch-size", 2, "--seq-len", 16, "--dropout", 0.1, "--seed", 3, "--device", "cpu",
         "--storage-dtype", "float32", "--export-dtype", "float32", "--ram-budget", 0, "--rank-timeout", 60,
         "--fingerprint-every", 1]
OPTIMIZERS = {"sgd": ["--optimizer", "sgd", "--lr", 0.2, "--grad-accum", 2],
              "adalite": ["--optimizer", "adalite", "--lr", 0.02, "--grad-accum", 4]}


@pytest.fixture(scope="module")
def src(tiny):
    return tiny(dim=64, layers=3, heads=4, kv_heads=2, shards=2, vocab=512, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(*argvs, envs=None, timeout=120, script=("finetune.py",)) -> list[tuple[int, str, float]]:
    """Runs finetune.py (or ``script``) once per argv as the ranks of one launch; (exit status,
    stderr, seconds) of each."""
    port, started = free_port(), time.monotonic()
    procs = [subprocess.Popen([sys.executable, *script, *map(str, argv)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1",  # (as torchrun sets it: a thread a rank)
                                   "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(len(argvs)),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **((envs or {}).get(r, {}))})
             for r, argv in enumerate(argvs)]
    out = []
    for p in procs:
        said, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err if script[0] == "finetune.py" else said + err, time.monotonic() - started))
    return out


COLLECTIVES = """
import json, sys, torch
from pathlib import Path
from slowft.distributed import Ranks
from slowft.errors import RanksDiverged, SlowftError
from slowft.store import Store

r, out = Ranks(torch.device("cpu"), timeout_s=30), {}
t = torch.arange(12.0).reshape(3, 4).T * (r.rank + 1)  # not contiguous: summed through a copy
out["sum"] = r.reduce_(t).tolist()
out["any"], out["least"] = [r.any(r.rank == 1), r.any(False)], r.least(5 + r.rank)
for name, check, error in [("same", lambda: r.check_same({"--steps": 3, "--lr": 0.1 * (r.rank + 1)}), SlowftError),
                           ("diverged", lambda: r.check_fingerprints("ab" if r.rank == 0 else "ac", 7), RanksDiverged)]:
    try:
        check()
    except error as e:
        out[name] = str(e)
# rank 0 committed 4 units of step 2's backward; rank 1, killed before it did, has them prepared
store = Store(Path(sys.argv[1]) / f"rank-{r.rank}")
at = lambda step, done: {"step": step, "sweep": {"done": done} if done else None, "versions": {"head": step + (done > 0)}}
store.write_journal(at(2, 4) if r.rank == 0 else {**at(2, 0), "next": at(2, 4)})
r.agree_on_journal(store)
out["journal"] = store.read_journal()
store.write_journal(at(5, 0) if r.rank == 0 else at(3, 0))  # two runs apart: nothing to roll forward to
try:
    r.agree_on_journal(store)
except SlowftError as e:
    out["apart"] = str(e)
# the library: slowft.load with ranks; step() takes the whole batch, each rank computes its half
import slowft
tokens = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
with slowft.load(sys.argv[2], workdir=Path(sys.argv[1]) / f"lib-{r.rank}", ranks=r, progress=False) as m:
    out["loss"] = m.step(tokens[:, :-1], tokens[:, 1:], slowft.SGD(lr=0.5), dropout=0.1, micro_batch_size=1)
    torch.save(dict(m.named_tensors()), Path(sys.argv[1]) / f"lib-{r.rank}.pt")
print(json.dumps(out))
"""


def test_collectives_the_journals_agreement_and_the_library_on_two_ranks(src, tmp_path):
    """slowft.distributed on 2 real gloo ranks: sums (a tensor gloo cannot take in place is copied),
    decisions taken together, settings and weights compared, and the journals brought together:
    a rank one commit behind rolls forward to what it had prepared; ranks further apart are
    refused. Then slowft.load(ranks=) and one step of 4 micro-batches, 2 a rank: plain autograd's
    on the whole batch in RAM, and one process's step within 1e-6."""
    import slowft

    results = ranks([tmp_path, src], [tmp_path, src], script=("-c", COLLECTIVES))
    outs = []
    for rc, said, _ in results:
        assert rc == 0, said
        outs.append(json.loads(said.splitlines()[-1]))
    for out in outs:
        assert out["sum"] == (torch.arange(12.0).reshape(3, 4).T * 3).tolist()
        assert out["any"] == [True, False] and out["least"] == 5
        assert out["same"].startswith("--lr: rank 1 was given 0.2, rank 0 0.1; expected the same settings")
        assert out["diverged"].startswith("after step 7 rank 1's weights differ from rank 0's")
        assert out["journal"] == {"step": 2, "sweep": {"done": 4}, "versions": {"head": 3}}
        assert "rank 0 at step 5 (0 units done), rank 1 at step 3 (0 units done)" in out["apart"]
        assert "pass --reset-workdir to every rank" in out["apart"]
    tokens = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
    with slowft.load(src, workdir=tmp_path / "alone", device="cpu", progress=False) as m:
        loss = m.step(tokens[:, :-1], tokens[:, 1:], slowft.SGD(lr=0.5), dropout=0.1, micro_batch_size=1)
        alone = dict(m.named_tensors())
    split = [torch.load(tmp_path / f"lib-{r}.pt") for r in (0, 1)]
    assert outs[0]["loss"] == outs[1]["loss"] == pytest.approx(loss, rel=1e-6)
    ref = RefLlama(json.loads((src / "params.json").read_text()), load_meta(src))  # plain autograd, the same masks
    want = reference_grads(ref, tokens[:, :-1], tokens[:, 1:], 1, 0.1, seed=0, step=0)
    with torch.no_grad():
        for w in ref.named_meta().values():
            w -= 0.5 * w.grad
    assert outs[0]["loss"] == pytest.approx(want, rel=1e-5)
    for k, w in ref.named_meta().items():
        torch.testing.assert_close(split[0][k], w.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for k, want in alone.items():
        assert torch.equal(split[0][k], split[1][k])
        assert ((split[0][k].float() - want.float()).abs().max() / want.float().abs().max()).item() <= 1e-6, k


@pytest.fixture(scope="module")
def two_ranks(src, tmp_path_factory):
    """optimizer -> the run folder of an uninterrupted run on 2 ranks (made once)."""
    made = {}

    def run(name: str):
        if name not in made:
            tmp = tmp_path_factory.mktemp(f"ranks-{name}")
            argv = [src, *STEPS, *OPTIMIZERS[name], "--out", tmp / "out", "--workdir", tmp / "w"]
            for rc, err, _ in ranks(argv, argv):
                assert rc == 0, err
            made[name] = tmp
        return made[name]

    return run


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_compute_the_steps_of_one_process(src, two_ranks, tmp_path, name):
    """The same global batch, split between 2 ranks, gives one process's weights within 1e-6 (the
    ranks' sums of the micro-batches' gradients differ from one process's in rounding only); the
    ranks' work dirs stay bit-identical; every trained gradient is all-reduced exactly once."""
    run = two_ranks(name)
    assert finetune.main([str(src), *map(str, STEPS), *map(str, OPTIMIZERS[name]), "--out", str(tmp_path / "out"),
                          "--workdir", str(tmp_path / "w")]) == 0
    alone, split = load_meta(tmp_path / "out" / "model"), load_meta(run / "out" / "model")
    source = load_meta(src)
    for k, want in alone.items():
        assert k == "rope.freqs" or not torch.equal(want, source[k]), f"{k} was not trained"
        rel = ((split[k] - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-6, f"{k}: {rel:.2e}"
    units = [tree_hash(run / "w" / f"rank-{r}" / "units") for r in (0, 1)]
    assert units[0] == units[1] and len(units[0]) == 5
    records = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    args = open_source(src).args
    every_weight = reduced_bytes(args, plan_step(args.n_layers, 1))
    assert [r["reduced_bytes"] for r in records if "loss" in r] == [every_weight + 4] * 3  # (+ the loss)


def test_killed_rank_stops_the_other_and_both_resume_bit_identically(src, two_ranks, tmp_path):
    """Rank 1 killed as it writes its journal mid-step (rank 0 may have committed that point: it
    rolls forward), then rank 0 killed between micro-batches: each time the other rank exits 4 at
    once, naming the lost rank. Then rank 1 killed after rank 0's export, before it marks its run
    finished (rank 0 has): the rerun of both finishes the run again, bit-identical to an
    uninterrupted one."""
    argv = [src, *STEPS, *OPTIMIZERS["sgd"], "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    for victim, fault in [(1, "journal:3:kill"), (0, "backward_micro:3:kill")]:
        results = ranks(argv, argv, envs={victim: {"SLOWFT_FAULT": fault}})
        assert results[victim][0] == -9, f"{fault} not reached: {results[victim][1]}"
        rc, err, seconds = results[1 - victim]
        assert rc == 4 and "lost the other ranks" in err and "run the same torchrun command again" in err, err
        assert seconds < 60
    assert [rc for rc, _, _ in ranks(argv, argv, envs={1: {"SLOWFT_FAULT": "finish:1:kill"}})] == [0, -9]
    for rc, err, _ in ranks(argv, argv):
        assert rc == 0, err
    assert bits(tmp_path / "out" / "model") == bits(two_ranks("sgd") / "out" / "model")


def test_ranks_given_different_flags_exit_2_naming_the_flag(src, tmp_path):
    before = tree_hash(src)
    argv = [src, *STEPS, *OPTIMIZERS["sgd"], "--out", tmp_path / "out", "--workdir", tmp_path / "w"]
    results = ranks(argv, [*argv, "--lr", 0.3])
    for rc, err, _ in results:
        assert rc == 2 and err.count("\n") == 1, err
        assert "--lr: rank 1 was given 0.3, rank 0 0.2; expected the same flags" in err
    assert not (tmp_path / "w").exists() and tree_hash(src) == before


def test_grad_accum_must_split_evenly_between_the_ranks(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # (refused before any rank is joined)
    before = tree_hash(src)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: finetune.main([str(src), "--grad-accum", "3", "--out", str(tmp_path / "out"),
                                       "--workdir", str(tmp_path / "w")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert re.fullmatch(r"error: --grad-accum 3: each of the 2 ranks takes an equal share .* a multiple of 2", err[0])
    assert not (tmp_path / "w").exists() and tree_hash(src) == before


def test_a_model_folder_is_known_by_its_files_not_its_path(src, tmp_path):
    """Two machines' copies of one checkpoint agree (other paths, other file times); another
    checkpoint of the same shape does not."""
    import shutil

    from slowft.distributed import folder_digest

    copy = shutil.copytree(src, tmp_path / "elsewhere", copy_function=shutil.copy)
    assert folder_digest(copy) == folder_digest(src)
    shard = copy / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # a sampled page: weights of a fine-tuned sibling differ everywhere
    shard.write_bytes(bytes(data))
    assert folder_digest(copy) != folder_digest(src)
