"""Training memory does not grow with depth: one block streams through at a time."""
import textwrap

from conftest import PEAK_RSS, run_script


def peak_rss_training(src, workdir) -> tuple[int, int]:
    code = PEAK_RSS + textwrap.dedent(f"""
        import torch, slowft
        from slowft.offload import IOWorker
        from slowft.offloaded import OffloadedModel
        slowft.load({str(src)!r}, workdir={str(workdir)!r}, device="cpu", progress=False).close()
        store = slowft.store.Store({str(workdir)!r})
        # a slow disk (10 ms per write): whatever the I/O threads hold piles up if it can
        model = OffloadedModel(store, torch.device("cpu"), ram_budget=0, io=IOWorker(delay=0.01))
        tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
        opt = slowft.Adalite(lr=1e-3)
        print(*measure_peak(lambda: [model.step(tokens, tokens, opt) for _ in range(3)] + [model.io.drain()]))
    """)
    r = run_script("-c", code)
    assert r.returncode == 0, r.stderr
    growth, peak = map(int, r.stdout.split()[-2:])
    return growth, peak


def test_peak_rss_independent_of_depth(tiny, tmp_path):
    kw = dict(dim=512, heads=8, shards=1, multiple_of=256)
    block = (4 * 512 * 512 + 3 * 512 * 1536) * 4
    g4, peak4 = peak_rss_training(tiny(layers=4, **kw), tmp_path / "w4")
    g16, peak16 = peak_rss_training(tiny(layers=16, **kw), tmp_path / "w16")
    print(f"peak RSS 4 layers {peak4 / 1e6:.0f} MB (step +{g4 / 1e6:.0f} MB), "
          f"16 layers {peak16 / 1e6:.0f} MB (step +{g16 / 1e6:.0f} MB); block {block / 1e6:.1f} MB")
    assert abs(peak16 - peak4) / peak4 < 0.10
    assert g16 < g4 + 4 * block  # 12 more blocks on disk cost (next to) nothing in RAM; holding them, 12
