"""Prefetch and write-behind: never a stale read, exact byte accounting, residency by budget."""
import threading
import time
import weakref

import pytest
import torch

import slowft
from conftest import open_model
from slowft.directio import ALIGN
from slowft.streaming import IOWorker


def batch(vocab=512, B=2, T=16):
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def io_of_second_step(model, opt):
    """Bytes moved by one step after a first one (which creates optimizer state and the cache)."""
    tokens, targets = batch()
    model.step(tokens, targets, opt)
    model.io.drain()
    before = model.store.stats.snapshot()
    model.step(tokens, targets, opt)
    model.io.drain()
    return model.store.stats.delta(model.store.stats.snapshot(), before)


def train(model, steps=3):
    tokens, targets = batch()
    opt = slowft.Adalite(lr=0.01)
    losses = [model.step(tokens, targets, opt, dropout=0.1, seed=1) for _ in range(steps)]
    model.sync()
    return losses, dict(model.named_tensors())


@pytest.mark.parametrize("page_cache", ["off", "on"])
def test_delayed_background_io_equals_synchronous_io_bit_for_bit(gqa_model, tmp_path, page_cache):
    sync = open_model(gqa_model, tmp_path / "a", ram_budget=0, io=IOWorker(synchronous=True))
    with sync:
        want_losses, want = train(sync)
    slow = open_model(gqa_model, tmp_path / "b", ram_budget=0, io_depth=2, io=IOWorker(delay=0.03), page_cache=page_cache)
    with slow:
        got_losses, got = train(slow)
        assert slow.store.direct == (page_cache == "off")
    assert got_losses == want_losses
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bytes_written_per_step_equal_file_sizes(gqa_model, tmp_path):
    with open_model(gqa_model, tmp_path / "w", ram_budget=0) as model:
        io = io_of_second_step(model, slowft.Adalite(lr=0.01))
        files = sorted((tmp_path / "w" / "units").iterdir())
        assert all(".v000002." in p.name for p in files)  # every unit rewritten once, old versions gone
        assert io["written"]["weights"] + io["written"]["optim"] == sum(p.stat().st_size for p in files)
        assert io["written"]["optim"] > 0
        x = 2 * 16 * model.args.dim * 4
        # each block's input (data + a page of header) but the top block's, whose forward keeps its graph
        assert io["written"]["inputs"] == (x + ALIGN) * (model.args.n_layers - 1)
        assert io["read"]["inputs"] == io["written"]["inputs"]
        # reads: every unit twice, except the head and the top block, which stay in hand at the turn
        weights = sum(p.stat().st_size for p in files)
        assert weights < io["read"]["weights"] + io["read"]["optim"] + 2 * 1024 < 2 * weights


def test_time_blocked_on_the_disk_is_counted(gqa_model, tmp_path):
    """``io.waited`` (the step log's "SSD wait") counts what overlap did not hide: nothing when
    every transfer is done before it is needed, the disk's time when it is slower than compute."""
    tokens, targets = batch()
    with open_model(gqa_model, tmp_path / "a", ram_budget=0, io=IOWorker(synchronous=True)) as model:
        model.step(tokens, targets, slowft.SGD(lr=0.1))
        model.io.drain()
        assert model.io.waited == 0
    delay = 0.1  # per write: ~50 x this tiny step's arithmetic
    with open_model(gqa_model, tmp_path / "b", ram_budget=0, io=IOWorker(delay=delay)) as model:
        t0 = time.perf_counter()
        model.step(tokens, targets, slowft.SGD(lr=0.1))
        model.io.drain()
        took = time.perf_counter() - t0
        writes = model.args.n_layers + 2  # every unit, one after another on the writer thread
        assert writes * delay / 2 < model.io.waited <= took


def test_budget_larger_than_model_writes_nothing_between_syncs(gqa_model, tmp_path):
    with open_model(gqa_model, tmp_path / "w", ram_budget=10**9) as model:
        io = io_of_second_step(model, slowft.SGD(lr=0.1))
        assert model.cache.resident
        assert sum(io["read"].values()) == 0 and sum(io["written"].values()) == 0
        before = model.store.stats.snapshot()
        model.sync()
        io = model.store.stats.delta(model.store.stats.snapshot(), before)
        assert io["written"]["weights"] > 0


@pytest.mark.parametrize("resident_blocks", [1, 2])
def test_partial_budget_keeps_blocks_and_saves_reads(gqa_model, tmp_path, resident_blocks):
    with open_model(gqa_model, tmp_path / f"w{resident_blocks}", ram_budget=0) as model:
        block = max(model.unit_bytes[u] for u in model.layer_units)
        streaming = io_of_second_step(model, slowft.SGD(lr=0.1))["read"]["weights"]
    with open_model(gqa_model, tmp_path / f"v{resident_blocks}", ram_budget=0) as model:
        x = 2 * 16 * model.args.dim * 4
        model.ram_budget = resident_blocks * block + x * model.args.n_layers
        kept = io_of_second_step(model, slowft.SGD(lr=0.1))["read"]["weights"]
    assert streaming - kept >= 2 * resident_blocks * block * 0.99


def test_streaming_holds_the_unit_computing_and_one_more(gqa_model, tmp_path, monkeypatch):
    """With no budget and --io-depth 1, at most two units' buffers exist at any moment: the one
    computing, and the next read ahead or the last being written back. A unit read waits for the
    unit writes queued before it and fills the buffer they free, so no read runs beside a write
    (on a disk whose writes are slow here)."""
    lock, live, most, calls = threading.Lock(), [], [0], []

    with open_model(gqa_model, tmp_path / "w", ram_budget=0, io=IOWorker(delay=0.01)) as model:
        unit_size = min(model.unit_bytes.values())

        def counted(nbytes):  # directio.aligned_empty, keeping count of the unit-sized buffers alive
            buf = slowft.directio.anonymous_pages(nbytes)
            if nbytes >= unit_size:
                with lock:  # (a weak reference to a buffer being freed is already dead)
                    live[:] = [ref for ref in live if ref() is not None] + [weakref.ref(buf)]
                    most[0] = max(most[0], len(live))
            return torch.frombuffer(buf, dtype=torch.uint8)

        def timed(kind, fn):
            def call(*args):
                t0 = time.monotonic()
                out = fn(*args)
                calls.append((kind, t0, time.monotonic()))
                return out
            return call

        monkeypatch.setattr(slowft.directio, "aligned_empty", counted)
        monkeypatch.setattr(model.store, "read_unit", timed("read", model.store.read_unit))
        monkeypatch.setattr(model.store, "write_unit", timed("write", model.store.write_unit))
        tokens, targets = batch()
        for _ in range(3):
            model.step(tokens, targets, slowft.SGD(lr=0.1))
        model.io.drain()
    reads = [(a, b) for kind, a, b in calls if kind == "read"]
    writes = [(a, b) for kind, a, b in calls if kind == "write"]
    assert len(reads) > model.args.n_layers and len(writes) == 3 * (model.args.n_layers + 2)
    assert most[0] == 2
    assert not [(r, w) for r in reads for w in writes if r[0] < w[1] and w[0] < r[1]]


def test_adalite_growing_its_units_keeps_recycling_buffers_and_spares(tiny, tmp_path, monkeypatch):
    """Adalite's first update adds its state to every unit, so every file grows once. The buffer
    pool must then take the larger buffers (or every later read faults in fresh memory), and the
    imported files, of a size no write will take again, must go rather than wait as spares (a
    model's worth of disk)."""
    new = [0]
    real = slowft.directio.aligned_empty

    def counted(nbytes):
        new[0] += nbytes >= unit_size
        return real(nbytes)

    with open_model(tiny(dim=128, layers=4, heads=4), tmp_path / "w", ram_budget=0) as model:  # its blocks grow by a page
        imported = {p.stat().st_size for p in (tmp_path / "w" / "units").iterdir()}
        unit_size = min(imported)
        unit_reads = 2 * 2 * len(model.unit_bytes)  # two steps
        tokens, targets = batch()
        opt = slowft.Adalite(lr=0.01)
        model.step(tokens, targets, opt)
        model.io.drain()
        monkeypatch.setattr(slowft.directio, "aligned_empty", counted)
        for _ in range(2):
            model.step(tokens, targets, opt)
        model.io.drain()
        monkeypatch.undo()
        units = {p.stat().st_size for p in (tmp_path / "w" / "units").iterdir()}
        spares = [p.stat().st_size for p in (tmp_path / "w" / "scratch").glob("spare.*")]
    gone = imported - units  # sizes no unit has any more (the blocks grew by pages; the head's state fits its padding)
    assert gone and any(n in units for n in spares) and not any(n in gone for n in spares)
    assert new[0] <= unit_reads // 4  # unit buffers made anew (before: one per read)
