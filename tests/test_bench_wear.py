"""bench/bench_wear.py runs end to end and its figures add up (it times nothing here)."""
import json
import math

from conftest import ROOT, run_script

CATEGORIES = ("weights", "optim", "inputs", "grads", "journal")


def test_bench_wear_reports_every_figure_and_bytes_that_add_up(tmp_path):
    r = run_script(ROOT / "bench" / "bench_wear.py", "--dim", "64", "--layers", "2", "--heads", "4",
                   "--batch", "1", "--seq", "16", "--steps", "1", "--ks", "1", "4", "--trained", "all", "--quality-steps", "3",
                   "--quality-batch", "2", "--quality-seq", "32",
                   "--cache", tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    grid = out["grid"]
    # (a frozen subset's writes, measured against projected: tests/test_plan.py)
    assert set(grid) == {f"K{k}-{s}-all" for k in (1, 4) for s in ("fp32", "bf16-sr")}
    for name, g in grid.items():
        assert g["tokens_per_step"] == g["k"] * 16
        assert len(g["steps_s"]) == 1 and all(t > 0 for t in g["steps_s"])
        for key in ("tokens_per_s", "peak_rss", "written_bytes_per_token", "projected_bytes_per_token",
                    "written_total_per_step", "projected_total_per_step", "model_bytes", "warmup_s"):
            assert g[key] > 0, (name, key)
        assert set(g["written_per_step"]) == set(g["projected_per_step"]) == set(CATEGORIES)
        assert g["written_per_step"]["weights"] > 0 and g["written_per_step"]["journal"] > 0
        # the projection (slowft.plan) is what the step wrote, within 10 %, in all and by kind
        assert abs(g["written_over_projected"] - 1) <= 0.1, name
        assert g["written_total_per_step"] == sum(g["written_per_step"].values())
        for cat in ("weights", "optim", "inputs", "grads"):
            assert g["written_per_step"][cat] == g["projected_per_step"][cat], (name, cat)
        assert g["written_bytes_per_token"] == g["written_total_per_step"] / g["tokens_per_step"]
        assert g["page_cache"] == (out["page_cache"] == "on")  # one decision for every configuration
    for s in ("fp32", "bf16-sr"):
        # each unit written once a step, whatever K: wear per token falls with K
        assert grid[f"K4-{s}-all"]["written_bytes_per_token"] < grid[f"K1-{s}-all"]["written_bytes_per_token"]
    for k in (1, 4):  # bf16 halves the weights written
        ratio = grid[f"K{k}-bf16-sr-all"]["written_per_step"]["weights"] / grid[f"K{k}-fp32-all"]["written_per_step"]["weights"]
        assert 0.45 < ratio < 0.55
    goals = out["goals"]
    assert goals["config"] == "K4-bf16-sr-all" and goals["baseline"] == "K1-fp32-all"
    assert goals["a_bytes_per_token_ratio"] == (grid["K1-fp32-all"]["written_bytes_per_token"]
                                                / grid["K4-bf16-sr-all"]["written_bytes_per_token"])
    assert goals["a_bytes_per_token_ratio"] > 1 and goals["b_tokens_per_s_ratio"] > 0
    assert goals["a_met"] == (goals["a_bytes_per_token_ratio"] >= 20)

    q = out["quality"]
    assert set(q["runs"]) == {f"{v}/{s}" for v in ("demo-lr", "small-lr") for s in ("fp32", "bf16-sr", "bf16-nearest")} | {
        "demo-lr/bf16-sr-seed+1", "demo-lr/fp32-accum2"}  # the noise floors: other rounding noise, another summation order
    assert 0 < q["heldout_tokens"] < q["tokens"] and q["heldout_scored"] == q["heldout_tokens"] - 1
    befores = {run["heldout_before"] for run in q["runs"].values()}
    assert max(befores) - min(befores) < 1e-4  # every storage starts from the same (bf16) weights
    for name, run in q["runs"].items():
        for key in ("heldout_before", "heldout_after", "train_before", "train_after", "first_step_loss", "last_step_loss"):
            assert math.isfinite(run[key]) and run[key] > 0, (name, key)
        assert run["train_after"] < run["train_before"], name  # it trained
        assert run["heldout_curve"][0] == [0, run["heldout_before"]] and run["heldout_curve"][-1] == [3, run["heldout_after"]]
        assert run["heldout_best"] == min(x for _, x in run["heldout_curve"])
        if not name.endswith("/fp32"):
            for key in ("heldout_gap_vs_fp32", "heldout_best_gap_vs_fp32", "train_gap_vs_fp32", "train_progress_vs_fp32"):
                assert math.isfinite(run[key]), (name, key)
    assert q["runs"]["demo-lr/fp32-accum2"]["micro_batch_size"] == 1
    assert q["runs"]["demo-lr/bf16-sr-seed+1"]["step_seed"] == q["runs"]["demo-lr/bf16-sr"]["step_seed"] + 1
    assert q["goal"]["demo-lr"]["bf16_sr_reseeded_gap"] == q["runs"]["demo-lr/bf16-sr-seed+1"]["heldout_gap_vs_fp32"]
    for v in ("demo-lr", "small-lr"):
        assert q["goal"][v]["bf16_sr_heldout_gap"] == q["runs"][f"{v}/bf16-sr"]["heldout_gap_vs_fp32"]
    assert q["goal"]["demo-lr"]["fp32_noise_floor_gap"] == q["runs"]["demo-lr/fp32-accum2"]["heldout_gap_vs_fp32"]
    assert "goal (a)" in r.stdout and "goal (b)" in r.stdout and "held-out" in r.stdout
    assert not (tmp_path / "wear-work").exists()  # the grid's work dirs are removed
