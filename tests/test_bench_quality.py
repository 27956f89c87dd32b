"""bench/bench_quality.py runs end to end, and slowft's AdamW follows torch's on its fine-tune (it
times nothing here)."""
import json
import math

from conftest import ROOT, run_script


def test_bench_quality_runs_and_adamw_follows_torch(tmp_path):
    r = run_script(ROOT / "bench" / "bench_quality.py", "--dim", "64", "--layers", "2", "--heads", "4",
                   "--pretrain-steps", "4", "--steps", "3", "--eval-every", "1", "--lrs", "1", "--seq", "32",
                   "--optimizers", "torch-adamw", "adamw", "adalite", "--plot", tmp_path / "q.png")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert set(out["best"]) == {"torch-adamw", "adamw", "adalite"}
    for name, run in out["best"].items():
        assert len(run["curve"]) == 4 and all(math.isfinite(x) for x in run["curve"]), name
    # the same arithmetic, weights on SSD or in RAM: the held-out curves agree at every eval
    assert out["goals"]["adamw_max_rel_diff"] < 1e-5
    assert out["best"]["adamw"]["written_per_step"] > 2.5 * out["best"]["adalite"]["written_per_step"]  # its state
    assert out["bf16"] and (tmp_path / "q.png").stat().st_size > 10_000
