"""Training memory: it does not grow with depth (one block streams through at a time), and no
large gradient or activation is held longer than its use."""
import gc
import textwrap
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import slowft
from conftest import PEAK_RSS, open_model, run_script
from slowft.streaming import IOWorker


def peak_rss_training(src, workdir) -> tuple[int, int]:
    code = PEAK_RSS + textwrap.dedent(f"""
        import torch, slowft
        from slowft.streaming import IOWorker
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
    g8, peak8 = peak_rss_training(tiny(layers=8, **kw), tmp_path / "w8")
    print(f"peak RSS 4 layers {peak4 / 1e6:.0f} MB (step +{g4 / 1e6:.0f} MB), "
          f"8 layers {peak8 / 1e6:.0f} MB (step +{g8 / 1e6:.0f} MB); block {block / 1e6:.1f} MB")
    assert abs(peak8 - peak4) / peak4 < 0.10  # (holding the 4 more blocks: +15 %)
    assert g8 < g4 + 2 * block  # 4 more blocks on disk cost (next to) nothing in RAM; holding them, 4


class AllocatedPeak(TorchDispatchMode):
    """Bytes of the tensors that ops allocate, alive at the high point while it is entered: each
    new storage is followed to its end. Outputs that alias an input (views, in-place ops, the
    store's tensors set onto the buffers it read a unit into) allocate nothing and are not counted.
    Exact where RSS is not: allocator reuse and an I/O thread's timing move RSS by about as much
    as this file's 16 MB head (13 MB once, in CI). Sees the calling thread's ops only."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(st := t.untyped_storage()) not in self._seen:
                    self._seen.add(id(st))
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._gone, id(st), st.nbytes())
        return out

    def _gone(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def test_head_and_embedding_updates_never_hold_a_vocab_sized_gradient(tiny, tmp_path, monkeypatch):
    """With llama's 32k vocab the head and the embedding are the largest units; their gradients
    (and an optimizer's temporaries) are handled a few rows at a time, so a training step
    allocates next to nothing beyond what a forward pass does. A dense [vocab, dim] gradient alone
    would add the whole head's size, Adalite's full-size temporaries several times that. The I/O
    is synchronous, so that every op runs on this thread."""
    monkeypatch.setattr(slowft.optim, "CHUNK_BYTES", 256 << 10)
    src = tiny(dim=128, layers=2, heads=4, shards=1, multiple_of=32, params_vocab=32000)
    head = 32000 * 128 * 4
    tokens = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    for opt in (slowft.SGD(lr=1e-3), slowft.Adalite(lr=1e-5)):
        with open_model(src, tmp_path / opt.name, ram_budget=0, io=IOWorker(synchronous=True)) as model:
            model.step(tokens, tokens, opt)  # the first step makes Adalite's state
            with AllocatedPeak() as forward:
                model.logits(tokens)
            with AllocatedPeak() as step:
                model.step(tokens, tokens, opt)
        print(f"{opt.name}: allocated at the high point, forward {forward.peak / 1e6:.2f} MB, "
              f"step {step.peak / 1e6:.2f} MB; head {head / 1e6:.1f} MB")
        assert step.peak - forward.peak < 0.5 * head


def test_sgd_takes_a_block_matrix_gradient_a_slice_at_a_time(gqa_model, tmp_path, monkeypatch):
    """With an optimizer that reads each slice once, no block matrix's gradient exists whole:
    each slice it is handed lives in a buffer of a few rows (at dim 4096, w1's whole gradient
    would be 0.18 GB). Adalite reads each slice twice and takes autograd's whole gradient."""
    monkeypatch.setattr(slowft.optim, "CHUNK_BYTES", 4 * 64 * 8)  # 8 rows of a [*, 64] matrix
    seen: dict[tuple, list[int]] = {}  # (optimizer, shape) -> bytes behind each slice it was handed

    def spy(cls):
        update = cls.update

        def spied(self, p, rows, state, t, **kw):
            def watched(a, b):
                g = rows(a, b)
                seen.setdefault((cls.name, tuple(p.shape)), []).append(g.untyped_storage().nbytes())
                return g

            return update(self, p, watched, state, t, **kw)

        monkeypatch.setattr(cls, "update", spied)

    spy(slowft.SGD)
    spy(slowft.Adalite)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for opt in (slowft.SGD(lr=1e-3), slowft.Adalite(lr=1e-3)):
        with slowft.load(gqa_model, workdir=tmp_path / opt.name, device="cpu", ram_budget=0, progress=False) as model:
            model.step(tokens, tokens, opt)
            block = {tuple(t.shape) for k, t in model.named_tensors() if k.startswith("layers.0.") and t.dim() == 2}
    assert len(block) >= 3  # wq / wo, wk / wv (GQA), w1 / w3, w2
    for shape in block:
        whole = shape[0] * shape[1] * 4
        sgd, adalite = seen[("sgd", shape)], seen[("adalite", shape)]
        assert max(sgd) <= 8 * shape[1] * 4 < whole, shape
        assert min(adalite) >= whole, shape


def test_a_blocks_backward_lets_go_of_the_ffn_activations_before_autograd_goes_on(gqa_model, tmp_path, monkeypatch):
    """Past the gate, a block's backward needs w1's and w3's gradients, not their outputs (their
    backward takes their input): the outputs must be gone before autograd runs through the rest
    of the block (at dim 4096, batch 4 x 256: 90 MB of a block's high point)."""
    alive: list[int] = []  # per block backward: FFN-wide tensors alive beside the two gradients
    backward = torch.autograd.backward

    def spied(roots, grads, *a, **k):
        gc.collect()
        wide = [o for o in gc.get_objects() if type(o) is torch.Tensor and o.dim() == 3 and o.shape[-1] == hidden]
        alive.append(sum(not any(o is g for g in grads) for o in wide))
        return backward(roots, grads, *a, **k)

    monkeypatch.setattr(torch.autograd, "backward", spied)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for opt in (slowft.SGD(lr=1e-3), slowft.Adalite(lr=1e-3)):
        with slowft.load(gqa_model, workdir=tmp_path / opt.name, device="cpu", ram_budget=0, progress=False) as model:
            hidden = model.args.hidden_dim
            alive.clear()
            model.step(tokens, tokens, opt)
            assert alive == [0] * model.args.n_layers, (opt.name, alive)
