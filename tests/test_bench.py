"""bench/bench_step.py runs end to end and its figures add up (it times nothing here)."""
import json
import sys

from conftest import ROOT, run_script


def test_bench_step_reports_every_figure_and_exact_bytes(tmp_path):
    r = run_script(ROOT / "bench" / "bench_step.py", "--dim", "64", "--layers", "2", "--heads", "4",
                   "--batch", "1", "--seq", "16", "--steps", "2", "--cache", tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    for side in ("slowft", "ram", "io"):
        assert len(out["steps_s"][side]) == 2 and all(t > 0 for t in out["steps_s"][side])
        for cpu in ("cpu_steal_s", "cpu_idle_s"):
            if sys.platform == "linux":  # from /proc/stat, around each of the side's steps
                assert len(out[cpu][side]) == 2 and all(x >= 0 for x in out[cpu][side])
    assert all(0 <= w <= t for w, t in zip(out["slowft_io_wait_s"], out["steps_s"]["slowft"], strict=True))
    model, inputs = out["model_bytes"], out["saved_inputs_bytes"]
    assert model == sum(out["unit_bytes"].values()) and inputs == 2 * 1 * 16 * 64 * 4
    # SGD streaming every unit through the disk: each one written once a step, read once or twice
    assert out["written_bytes"]["weights"] == model
    assert out["written_bytes"]["inputs"] == out["read_bytes"]["inputs"] == inputs
    assert model <= out["read_bytes"]["weights"] <= 2.1 * model
    assert out["ratio"] == out["slowft_step_s"] / out["compute_step_s"]
    assert out["overlap_efficiency"] == max(out["compute_step_s"], out["io_step_s"]) / out["slowft_step_s"]
    for key in ("slowft_peak_rss", "ram_peak_rss", "import_MBps", "export_MBps"):
        assert out[key] > 0
    assert "T_slowft" in r.stdout and "overlap efficiency" in r.stdout
