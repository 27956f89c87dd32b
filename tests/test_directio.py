"""Reads and writes with and without the page cache: aligned buffers, odd sizes, the fallback
where a filesystem refuses O_DIRECT, no needless copies, the choice of mode."""
import errno
import os

import pytest
import torch

from slowft import directio
from slowft.directio import ALIGN, aligned_empty, read_file, write_file_atomic
from slowft.store import Store, encode_safetensors, read_safetensors, save_safetensors


@pytest.fixture(params=[True, False], ids=["direct", "page-cache"])
def direct(request):
    return request.param


@pytest.mark.parametrize("size", [1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17])
def test_round_trip_of_any_size(tmp_path, direct, size):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    buf = aligned_empty(size)
    assert buf.data_ptr() % ALIGN == 0 and buf.numel() % ALIGN == 0 and buf.numel() >= size
    buf[:size] = data
    assert write_file_atomic(tmp_path / "f", buf, size, direct=direct) == size
    assert (tmp_path / "f").stat().st_size == size
    assert (tmp_path / "f").read_bytes() == bytes(data.numpy())
    got, n = read_file(tmp_path / "f", direct=direct)
    assert n == size and got.data_ptr() % ALIGN == 0 and torch.equal(got[:size], data)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left


def test_filesystem_refusing_o_direct_falls_back_to_buffered(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(directio, "supported", True)
    real_open = os.open

    def refusing(path, flags, *args):  # as tmpfs before Linux 6.6: creates the file, then refuses
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, *args))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    tensors = {"w": torch.randn(33, 7), "n": torch.randn(5).to(torch.bfloat16)}
    save_safetensors(tmp_path / "u.safetensors", tensors)
    assert directio.supported is False
    got, _ = read_safetensors(tmp_path / "u.safetensors")
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_read_into_a_recycled_buffer_and_write_back_without_a_copy(tmp_path, direct, monkeypatch):
    store = Store(tmp_path / "w")
    store.direct = direct
    tensors = {"attention.wq.weight": torch.randn(64, 48), "ffn_norm.weight": torch.randn(48), "optim.c": torch.zeros(3)}
    store.write_unit("layers.0", 0, tensors)
    lent = aligned_empty(1 << 20)
    got = store.read_unit("layers.0", 0, take=lambda n: lent)
    assert all(t.untyped_storage().data_ptr() == lent.untyped_storage().data_ptr() for t in got.values())
    got["attention.wq.weight"].add_(1.0)  # an update in place, as the fused optimizer does
    made = []
    monkeypatch.setattr("slowft.store.aligned_empty", lambda n: made.append(n) or aligned_empty(n))
    store.write_unit("layers.0", 1, got)
    assert made == []  # written straight from the buffer it was read into
    again = store.read_unit("layers.0", 1)
    assert torch.equal(again["attention.wq.weight"], tensors["attention.wq.weight"] + 1.0)
    assert torch.equal(again["ffn_norm.weight"], tensors["ffn_norm.weight"])


def test_tensors_sharing_a_buffer_are_not_autograd_views(tmp_path):
    save_safetensors(tmp_path / "u.safetensors", {"a": torch.randn(4, 4), "b": torch.randn(4, 4)})
    t, _ = read_safetensors(tmp_path / "u.safetensors")
    a, b = t["a"].detach().requires_grad_(True), t["b"].detach().requires_grad_(True)
    y = (a @ b).sum()
    t["a"].add_(1.0)  # b's saved value is untouched; a's version counter alone moves
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    a2, b2 = t["a"].detach().requires_grad_(True), t["b"].detach().requires_grad_(True)
    z = (a2 * 2).sum() + (b2 @ b2).sum()
    t["a"].add_(1.0)  # a is not saved by z's graph: b's (shared buffer) must not look modified
    z.backward()


def test_header_pads_data_to_a_page(tmp_path):
    buf, size = encode_safetensors({"x": torch.randn(10)})
    (n,) = torch.frombuffer(bytearray(buf[:8].numpy().tobytes()), dtype=torch.int64).tolist()
    assert (8 + n) % ALIGN == 0 and size == 8 + n + 40


def test_page_cache_only_where_it_holds_what_streams():
    from slowft.offloaded import use_page_cache

    assert use_page_cache(1 << 30, 20 << 30)  # a small model on a roomy machine: reads come from RAM
    assert not use_page_cache(52 << 30, 8 << 30)  # llama2-13b in fp32 on a 16 GB Mac: straight from the SSD
    assert not use_page_cache(6 << 30, 10 << 30)  # would fit, but not with room to spare
    assert not use_page_cache(0, 20 << 30)  # everything resident: writes at syncs are never read back


def test_pack_lays_out_a_gpu_units_host_copy_as_its_file(tmp_path, monkeypatch):
    """The copy-out of a unit computed on a GPU: pack() fills one recycled host buffer laid out as
    the file, which is then written without another copy and lent back to the pool."""
    from slowft.streaming import BufferPool
    from slowft.store import pack

    tensors = {"attention.wq.weight": torch.randn(64, 48), "attention_norm.weight": torch.randn(48).to(torch.bfloat16)}
    pool = BufferPool(max_bytes=1 << 20)
    pool.give(pack({"x": torch.zeros(100_000)}))  # a buffer a larger unit left behind
    assert pool.bytes > 0
    host = pack(tensors, take=pool.take)
    assert pool.bytes == 0  # the recycled buffer was used
    assert len({t.untyped_storage().data_ptr() for t in host.values()}) == 1
    assert all(torch.equal(host[k], t) for k, t in tensors.items())
    store = Store(tmp_path / "w")
    made = []
    monkeypatch.setattr("slowft.store.aligned_empty", lambda n: made.append(n) or aligned_empty(n))
    store.write_unit("layers.0", 0, host)
    assert made == []
    got = store.read_unit("layers.0", 0)
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    pool.give(host)
    assert pool.bytes >= 64 * 48 * 4
