"""Bad input: one line naming the file or flag and what was expected, exit 2, no traceback,
the source folder untouched, nothing half-written."""
import json
import shutil

import pytest

import finetune
import test_gen
from conftest import ROOT, run_script, tree_hash
from slowft import cli


@pytest.fixture(scope="module")
def good(tiny):
    return tiny(dim=64, layers=2, heads=4, kv_heads=2, shards=2)


@pytest.fixture
def broken(good, tmp_path):
    """A private copy of a good model to damage; checks afterwards that it was not written to."""
    path = tmp_path / "model"
    shutil.copytree(good, path)
    return path


@pytest.fixture
def fails(capsys, tmp_path):
    """fails(main, *argv) -> the error line, after checking exit 2, one line and the source unchanged."""
    def check(main, *argv, source=None):
        before = tree_hash(source) if source else None
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: main([str(a) for a in argv]))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, err
        assert len(err) == 1 and err[0].startswith("error: "), err
        if source:
            assert tree_hash(source) == before
        return err[0]

    return check


def train_args(model, tmp_path, *more):
    return [model, "--out", tmp_path / "out", "--workdir", tmp_path / "w", "--steps", 1, "--grad-accum", 1, *more]


def test_missing_or_malformed_params(good, broken, tmp_path, fails):
    (broken / "params.json").write_text("{not json")
    assert "params.json: malformed" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    (broken / "params.json").write_text(json.dumps({"n_layers": 2, "n_heads": 4}))
    assert "'dim' must be a positive integer" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    good_params = json.loads((good / "params.json").read_text())
    for key, value, message in [("norm_eps", None, "'norm_eps' must be a positive number"),
                                ("norm_eps", -1e-5, "'norm_eps' must be a positive number"),
                                ("rope_theta", "1e4", "'rope_theta' must be a positive number"),
                                ("multiple_of", 0, "'multiple_of' must be a positive integer"),
                                ("ffn_dim_multiplier", "big", "'ffn_dim_multiplier' must be a positive number"),
                                ("max_seq_len", "x", "'max_seq_len' must be a positive integer")]:
        (broken / "params.json").write_text(json.dumps({**good_params, key: value}))
        assert message in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    (broken / "params.json").unlink()
    assert "params.json: missing" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    (broken / "params.json").mkdir()
    assert "params.json: not a file" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    assert not (tmp_path / "w").exists()  # nothing was started


def test_missing_or_bad_tokenizer(broken, tmp_path, fails):
    (broken / "tokenizer.model").write_bytes(b"garbage")
    assert "tokenizer.model: not a readable sentencepiece model" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    (broken / "tokenizer.model").unlink()
    assert "tokenizer.model: missing" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)


def test_missing_extra_truncated_and_contradicting_shards(broken, tmp_path, fails):
    one = broken / "consolidated.01.pth"
    data = one.read_bytes()
    one.write_bytes(data[: len(data) // 2])
    msg = fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    assert "consolidated.01.pth: unreadable or truncated shard" in msg
    one.write_bytes(data)
    shutil.copy(one, broken / "consolidated.02.pth")
    msg = fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    assert "consolidated.00.pth" in msg and "split over the 3 shard(s) found" in msg
    (broken / "consolidated.02.pth").unlink()
    one.unlink()
    assert "split over the 1 shard(s) found" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    shutil.copy(broken / "consolidated.00.pth", broken / "consolidated.02.pth")
    assert "consolidated.01.pth: missing" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    for p in broken.glob("consolidated.*.pth"):
        p.unlink()
    assert "no consolidated.00.pth" in fails(finetune.main, *train_args(broken, tmp_path), source=broken)


def test_shapes_that_contradict_params(good, broken, tmp_path, fails):
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    assert "missing tensor layers.2." in fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    (broken / "params.json").write_text(json.dumps({**params, "ffn_dim_multiplier": 2.0}))
    msg = fails(finetune.main, *train_args(broken, tmp_path), source=broken)
    assert "feed_forward.w1.weight has shape" in msg and "expected" in msg


def test_no_model_folder(tmp_path, fails):
    assert "no such folder" in fails(test_gen.main, tmp_path / "nowhere", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "params.json: missing" in fails(finetune.main, *train_args(empty, tmp_path), source=empty)
    (empty / "model.safetensors").write_bytes(b"")
    assert "config.json: missing" in fails(test_gen.main, empty, "cpu", source=empty)
    assert "expected it with --chat" in fails(test_gen.main, empty, "cpu", "--system", "Be brief.")


def test_bad_data_files(good, tmp_path, fails):
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "bin.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)) * 4)
    short.write_text("Too short.")
    assert "empty.txt: file is empty" in fails(finetune.main, *train_args(good, tmp_path, "--data", empty), source=good)
    assert "bin.txt: looks binary" in fails(finetune.main, *train_args(good, tmp_path, "--data", binary), source=good)
    msg = fails(finetune.main, *train_args(good, tmp_path, "--data", short), source=good)
    assert "short.txt" in msg and "shorter than one sequence" in msg
    assert "no such file" in fails(finetune.main, *train_args(good, tmp_path, "--data", tmp_path / "none.txt"))


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", 5000], "--seq-len 5000: above the model's limit of 4096"),
    (["--steps", 0], "--steps 0: expected a positive integer"),
    (["--batch-size", -2], "--batch-size -2: expected a positive integer"),
    (["--lr", 0], "--lr 0.0: expected a positive number"),
    (["--lr", "inf"], "--lr inf: expected a positive number"),
    (["--optimizer", "sgd", "--weight-decay", "inf"], "--weight-decay inf: expected a number >= 0"),
    (["--ram-budget", "inf"], "--ram-budget inf: expected a size"),
    (["--step", 5], "unrecognized arguments: --step"),
    (["--resume", "--reset-workdir"], "--resume --reset-workdir: one continues the unfinished run"),
    (["--demo"], "--demo: trains a tiny model it makes itself; expected no model folder"),
    (["--export-shards", 3], "--export-shards 3: tok_embeddings.weight of shape [512, 64] does not split into 3"),
    (["--dropout", 1.5], "--dropout 1.5: expected a number in [0, 1)"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice"),
    (["--ram-budget", "lots"], "--ram-budget lots: expected a size"),
    (["--device", "tpu"], "--device tpu: unknown device"),
    (["--device", "mps"], "--device mps: not available on this machine"),
])
def test_bad_flags(good, tmp_path, fails, flags, message):
    if flags == ["--device", "mps"]:
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has mps")
    assert message in fails(finetune.main, *train_args(good, tmp_path, *flags), source=good)


def test_output_and_workdir_places(broken, good, tmp_path, fails):
    assert "is inside the source model folder" in fails(finetune.main, broken, "--out", broken, source=broken)
    assert "is inside the source model folder" in fails(finetune.main, broken, "--out", broken / "sub", source=broken)
    assert "is inside the source model folder" in fails(finetune.main, broken, "--out", tmp_path / "o", "--workdir", broken / "w", source=broken)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "--out" in fails(finetune.main, broken, "--out", blocker / "out", source=broken)
    assert "cannot create the work dir" in fails(finetune.main, broken, "--out", tmp_path / "o", "--workdir", blocker / "w", source=broken)
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert "not a slowft work dir" in fails(finetune.main, broken, "--out", tmp_path / "o", "--workdir", mine, source=broken)
    # the export replaces <out>/model whole, and old checkpoints are deleted: never the source's or the user's
    assert "the source model folder" in fails(finetune.main, broken, "--out", tmp_path, source=broken)  # <out>/model
    kept = tmp_path / "run" / "checkpoints" / "step-000010"  # fine-tuning further from a checkpoint
    shutil.copytree(broken, kept)
    assert "among its checkpoints" in fails(finetune.main, kept, "--out", tmp_path / "run", source=kept)
    (tmp_path / "o" / "model").mkdir(parents=True)
    (tmp_path / "o" / "model" / "thesis.tex").write_text("precious")
    assert "holds thesis.tex, which an export does not write" in fails(
        finetune.main, broken, "--out", tmp_path / "o", "--workdir", tmp_path / "w2", source=broken)
    assert "holds the work dir" in fails(finetune.main, broken, "--out", tmp_path / "o2", "--workdir", tmp_path / "o2" / "model" / "w", source=broken)
    assert (mine / "thesis.tex").read_text() == "precious" and len(list(mine.iterdir())) == 1
    assert (tmp_path / "o" / "model" / "thesis.tex").read_text() == "precious"


def test_unwritable_demo_cache(tmp_path, fails, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SLOWFT_CACHE", str(blocker))
    assert "cannot write the demo model" in fails(finetune.main, "--demo")


def test_workdir_of_another_model_and_resume_without_run(good, tiny, tmp_path, fails):
    import slowft

    slowft.load(good, workdir=tmp_path / "w", device="cpu", progress=False).close()
    other = tiny(dim=64, layers=3, heads=4, shards=1)
    msg = fails(finetune.main, *train_args(other, tmp_path), source=other)
    assert "work dir belongs to" in msg and "--reset-workdir" in msg
    assert "--resume" in fails(finetune.main, *train_args(good, tmp_path, "--resume", "--storage-dtype", "float32"), source=good)


def test_unfinished_run_with_other_settings(good, tmp_path, fails):
    r = run_script("finetune.py", *train_args(good, tmp_path, "--steps", 3, "--device", "cpu", "--batch-size", 1,
                                               "--seq-len", 8, "--ram-budget", 0),
                   env={"SLOWFT_FAULT": "backward_unit:2:kill"})
    assert r.returncode == -9
    msg = fails(finetune.main, *train_args(good, tmp_path, "--steps", 3, "--device", "cpu", "--batch-size", 1,
                                           "--seq-len", 8, "--lr", 0.5), source=good)
    assert "unfinished run with lr = 0.001 (now 0.5)" in msg


def test_a_real_process_prints_no_traceback(broken):
    data = (broken / "consolidated.00.pth").read_bytes()
    (broken / "consolidated.00.pth").write_bytes(data[:1000])
    before = tree_hash(broken)
    for script in ("finetune.py", "test_gen.py"):
        r = run_script(ROOT / script, broken)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
        assert "consolidated.00.pth: unreadable or truncated shard" in r.stderr
    assert tree_hash(broken) == before


@pytest.mark.parametrize("kw, message", [
    (dict(heads=3), "dim must divide into n_heads heads"),
    (dict(kv_heads=3), "n_heads into n_kv_heads groups"),
    (dict(layers=0), "'n_layers' must be a positive integer"),
    (dict(ffn_mult=-1.0), "'ffn_dim_multiplier' must be a positive number"),
    (dict(vocab=10), "--vocab 10: expected at least 260"),
])
def test_tiny_models_only_in_shapes_the_loader_takes(tmp_path, kw, message):
    from slowft.errors import SlowftError
    from slowft.tiny import make_tiny

    with pytest.raises(SlowftError, match=message):
        make_tiny(tmp_path / "m", **kw)
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_accumulation_subset_and_write_budget_flags(good, tmp_path, fails, monkeypatch):
    """Each one line, exit 2, and nothing written: no work dir, no --out folder."""
    (tmp_path / "tiny.txt").write_text("Too short to hold one window.")  # a val set no window fits
    (tmp_path / "chat.jsonl").write_text('{"text": "fine"}\n{"messages": [}\n')
    monkeypatch.chdir(tmp_path)
    for flags, message in [(["--grad-accum", 0], "--grad-accum 0: expected a positive integer"),
                           (["--train-layers", "5-2"], "--train-layers 5-2: expected A-B with 0 <= A <= B"),
                           (["--train-layers", "x"], "--train-layers x: expected a range"),
                           (["--train-layers", "1-2"], "--train-layers 1-2: the model has layers 0-1"),
                           (["--lisa", 3], "--lisa 3: above the model's 2 layers"),
                           (["--lisa", 1, "--train-layers", "0-1"], "LISA samples the blocks itself"),
                           (["--max-ssd-writes", "banana"], "--max-ssd-writes banana: expected a size"),
                           (["--optimizer", "adam"], "--optimizer: invalid choice: 'adam'"),
                           (["--data", "chat.jsonl"], "chat.jsonl:2: malformed JSON"),
                           (["--data", "chat.jsonl", "--train-on-prompt", "--val-fraction", 0.5], "chat.jsonl:2: malformed JSON"),
                           (["--val-fraction", 0.7], "--val-fraction 0.7: expected a number in (0, 0.5]"),
                           (["--val-fraction", 0.2, "--val-data", "x.txt"], "one holds out other files"),
                           (["--val-data", "tiny.txt", "--seq-len", 64], "--val-data"),
                           (["--lr=-1e-3"], "--lr -0.001: expected a positive number"),
                           (["--optimizer", "adamw", "--betas", 0.9, 1.0], "--betas 0.9 1.0: expected two numbers in [0, 1)"),
                           (["--optimizer", "sgd", "--optim-state-dtype", "bfloat16"],
                            "--optim-state-dtype bfloat16: --optimizer sgd has no such setting"),
                           (["--optimizer", "adalite", "--betas", 0.9, 0.99], "--betas 0.9 0.99: --optimizer adalite has no such setting"),
                           (["--max-ssd-writes", "1M", "--steps", 50, "--ram-budget", 0],
                            "--max-ssd-writes 1.00 MB: this run is projected to write")]:
        msg = fails(finetune.main, *train_args(good, tmp_path, *flags), source=good)
        assert message in msg, msg
        assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists(), flags
    # the levers that would bring it under are named
    assert all(lever in msg for lever in ("--grad-accum", "--storage-dtype", "--train-layers", "--lisa", "--ram-budget"))
