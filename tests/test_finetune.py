"""End to end, as a user runs it: finetune.py on a tiny model, then test_gen.py on the export."""
import io
import json
import math
import re

import slowft
from conftest import run_script, tree_hash

PROMPT = "The keeper of the north light"


def learned(continuation: str) -> bool:
    """The corpus continues the prompt with "climbed the hundred steps every evening at dusk"."""
    text = re.sub(r"\s+", " ", continuation).strip()
    return text.startswith("climbed") and "steps every evening at dusk" in text


def test_finetune_learns_and_exports(tiny, tmp_path, capsys, monkeypatch):
    """The demo's run: the prose's continuation learned, and test_data/chat.jsonl's answers, word
    for word, from test_gen.py --chat."""
    import test_gen
    from slowft.tiny import TEST_DATA

    src = tiny(dim=128, layers=4, heads=4, kv_heads=2, shards=2)
    before = tree_hash(src)
    out = tmp_path / "run"
    # the demo's settings, given in full (the default adalite moves each tensor by lr of its norm a step), but
    # resident: the same numbers as streaming (tests/test_resume.py), 15 s sooner; streaming: the next test
    r = run_script("finetune.py", src, "--steps", 120, "--batch-size", 16, "--grad-accum", 1, "--seq-len", 64, "--lr", 6e-2,
                   "--min-lr", 1.2e-2, "--warmup-steps", 3, "--device", "cpu", "--ram-budget", "1G", "--out", out,
                   "--workdir", tmp_path / "w", "--prompt", PROMPT, "--max-new-tokens", 24)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 121))
    assert steps[-1]["loss"] <= steps[0]["loss"] / 2
    assert tree_hash(src) == before  # nothing written in the source folder
    before_line = next(line for line in r.stdout.splitlines() if line.startswith("[before]"))
    assert not learned(before_line[len("[before] ") + len(PROMPT):])  # a random model knows no phrase of the corpus

    with slowft.load(out / "model", workdir=tmp_path / "w2", device="cpu", progress=False) as model:
        assert model.args.n_layers == 4 and model.meta["source"]["shards"] == 2

    capsys.readouterr()  # (test_gen.py's main in this process: no interpreter start for each of its runs)
    assert test_gen.main([str(out / "model"), "cpu", "--prompt", PROMPT, "--max-new-tokens", "24", "--workdir", str(tmp_path / "w2")]) == 0
    said = capsys.readouterr().out
    assert said.startswith(PROMPT) and learned(said[len(PROMPT):]), said
    chats = [json.loads(line)["messages"] for line in (TEST_DATA / "chat.jsonl").read_text().splitlines()]
    qa = dict((m[0]["content"], m[1]["content"]) for m in chats)
    assert len(qa) >= 4
    for question, answer in qa.items():
        assert test_gen.main([str(out / "model"), "cpu", "--chat", "--prompt", question, "--workdir", str(tmp_path / "w2")]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == answer, question
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n\n"))  # without --prompt: turns from stdin, to an empty line
    assert test_gen.main([str(out / "model"), "cpu", "--chat", "--workdir", str(tmp_path / "w2")]) == 0
    assert answer in capsys.readouterr().out


def test_a_collapse_to_the_uniform_output_stops_the_run():
    """A loss back at ln(vocab) after it had been lower: no NaN, but nothing will learn after it."""
    import math

    import pytest

    import finetune
    from slowft.errors import Diverged

    uniform = math.log(512)
    finetune.check_collapse(uniform + 0.02, math.inf, 512, 1)  # a random model starts near ln(vocab)
    finetune.check_collapse(uniform, uniform - 0.05, 512, 5)  # never well below it: no verdict
    finetune.check_collapse(uniform - 0.5, uniform - 2.0, 512, 9)  # worse, but not uniform
    with pytest.raises(Diverged, match="collapsed to a uniform output"):
        finetune.check_collapse(uniform + 2e-4, 1.3, 512, 12)


def test_held_out_loss_is_logged_and_plotted(tiny, tmp_path):
    """--val-fraction: the held-out loss before training, every --eval-every steps and at the end,
    in metrics.jsonl and on the console, and out/<model>/loss.png redrawn after each. Streaming
    (--ram-budget 0): every step writes its blocks, and the run's writes meet their projection."""
    src = tiny(dim=64, layers=2, heads=4, kv_heads=2, shards=2)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Note {i}. " + "The ferry left the quay at dawn with salt and wool. " * (3 + i))
    out = tmp_path / "run"
    r = run_script("finetune.py", src, "--data", docs, "--val-fraction", 0.3, "--steps", 5, "--eval-every", 2,
                   "--batch-size", 2, "--grad-accum", 2, "--seq-len", 16, "--device", "cpu", "--ram-budget", 0,
                   "--out", out, "--workdir", tmp_path / "w")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in records if "eval_loss" in rec]
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert all(e["eval_tokens"] > 0 and abs(e["eval_ppl"] - math.exp(e["eval_loss"])) < 1e-6 * e["eval_ppl"] for e in evals)
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("eval")] == ["0", "2", "4", "5"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [rec for rec in records if "loss" in rec and "eval_loss" not in rec]
    assert all(s["written_bytes"]["weights"] > 0 for s in steps[1:])  # ram budget 0: every block via the disk
    totals = [s["written_total_bytes"] for s in steps]
    assert totals == sorted(totals) and totals[-1] == sum(sum(s["written_bytes"].values()) for s in steps)
    # the writes were projected before the run, and the summary sets them against the projection
    projected = re.search(r"SSD writes: .* projected for 5 steps \(([-+][\d.]+)%\)", r.stdout)
    assert projected and abs(float(projected[1])) <= 10, r.stdout[-600:]
    assert re.search(r"MB per trained token; ~[\d.]+ [KMG]B for this run", r.stdout)


def test_held_out_examples_are_scored_whole_each_as_if_alone(gqa_model, tmp_path):
    """Held-out JSONL (with text beside it) is scored in packed rows: each example whole, its
    attention within it and its positions from 0, each text piece likewise, every one once. So
    the loss is the mean over the spans run alone through an in-RAM reference; the stream's
    windows, which cross examples, give another. Text alone keeps the windows."""
    import json
    from argparse import Namespace

    import torch
    import torch.nn.functional as F

    import finetune
    from reference import RefLlama, load_meta
    from slowft.data import TokenData
    from slowft.model import mean_loss, packed_positions
    from slowft.tokenizer import Tokenizer

    val_dir, seq = tmp_path / "val", 64
    val_dir.mkdir()
    rows = [{"messages": [{"role": "user", "content": "Where is the ferry?"}, {"role": "assistant", "content": "At the quay."}]},
            {"prompt": "The lamp was lit", "completion": " at dusk."}, {"text": "Salt and wool."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who bakes?"},
                          {"role": "assistant", "content": "The baker, at four."}]}]
    (val_dir / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (val_dir / "notes.txt").write_text("The ferry left the quay at dawn with salt and wool. " * 10)
    tok = Tokenizer(gqa_model / "tokenizer.model")
    val = TokenData.from_files([val_dir], tok, flag="--val-data")
    ref = RefLlama(json.loads((gqa_model / "params.json").read_text()), load_meta(gqa_model))
    total, counted = 0.0, 0
    for t, c, f in zip(val.tokens.long().split(val.lengths), val.counted.split(val.lengths), val.sources):
        y = t.masked_fill(~c, -1)
        for s in range(0, len(t) - 1, seq) if f.suffix == ".txt" else [0]:  # text: pieces of a row
            n = min(seq, len(t) - 1 - s)
            assert f.suffix == ".txt" or n == len(t) - 1  # each example whole
            with torch.no_grad():
                logits = ref(t[None, s : s + n])[0]
            total += F.cross_entropy(logits, y[s + 1 : s + 1 + n], ignore_index=-1, reduction="sum").item()
            counted += int((y[s + 1 : s + 1 + n] >= 0).sum())
    assert len(val.lengths) == 5 and len(val.tokens) > 2 * seq  # 4 examples, and the text in pieces
    a = Namespace(batch_size=2, seq_len=seq)
    with slowft.load(gqa_model, workdir=tmp_path / "w", device="cpu", progress=False) as model:
        held = finetune.HeldOut(model, val, a, finetune.StepLog(tmp_path / "metrics.jsonl", False), tmp_path)
        packed = held.evaluate(0)
        windowed = mean_loss(model.logits, *val.windows(seq), a.batch_size)
        text = TokenData.from_files([val_dir / "notes.txt"], tok, flag="--val-data")
        text_loss = finetune.HeldOut(model, text, a, held.log, tmp_path).evaluate(0)
        assert text_loss == mean_loss(model.logits, *text.windows(seq), a.batch_size)
    assert abs(packed - total / counted) < 1e-5
    # (rotary attention sees only relative positions, so restarting them shows in no loss: here)
    assert packed_positions(torch.tensor([[1, 1, 1, 2, 2, 0, 0]])).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["eval_tokens"] == counted
    assert abs(windowed - packed) > 1e-4, (windowed, packed)  # (a random model's losses are all near ln(vocab))
