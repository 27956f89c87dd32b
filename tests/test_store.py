"""The work directory: file format, atomic writes, locking, refusing foreign folders, clean-up."""
import errno

import pytest
import torch
from safetensors.torch import load_file, save_file

from slowft import faults
from slowft.atomic import write_atomic
from slowft.errors import SlowftError
from slowft.store import Store, read_safetensors, save_safetensors


def test_unit_files_are_standard_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4), "d": torch.ones(2, 2, dtype=torch.float16)}
    save_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    theirs = load_file(tmp_path / "x.safetensors")
    ours, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    for k, t in tensors.items():
        assert torch.equal(theirs[k], t) and torch.equal(ours[k], t) and ours[k].dtype == t.dtype
    save_file(tensors, tmp_path / "y.safetensors")
    assert all(torch.equal(read_safetensors(tmp_path / "y.safetensors")[0][k], t) for k, t in tensors.items())


def test_truncated_file_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "w")
    store.write_unit("layers.0", 0, {"w": torch.randn(64, 64)})
    path = store.unit_path("layers.0", 0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SlowftError, match="layers.0.v000000.safetensors.*unreadable"):
        store.read_unit("layers.0", 0)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_atomic(target, lambda f: f.write(b"old"))
    monkeypatch.setattr(faults, "_point", "p")
    monkeypatch.setattr(faults, "_n", "1")
    monkeypatch.setattr(faults, "_action", "enospc")
    with pytest.raises(OSError) as e:
        write_atomic(target, lambda f: f.write(b"new" * 1000), fault_point="p")
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_lock_foreign_folder_and_garbage(tmp_path):
    store = Store(tmp_path / "w")
    with pytest.raises(SlowftError, match="in use by another slowft process"):
        Store(tmp_path / "w")
    store.close()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SlowftError, match="not a slowft work dir"):
        Store(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"

    store = Store(tmp_path / "w")
    for v in (3, 4):
        store.write_unit("head", v, {"w": torch.zeros(2)})
    store.write_scratch("input.0", torch.zeros(3), "inputs")
    (store.root / "units" / ".head.v000005.safetensors.1234.tmp").write_bytes(b"half")
    store.collect_garbage({"head": 4}, set())
    assert sorted(p.name for p in (store.root / "units").iterdir()) == ["head.v000004.safetensors"]
    assert not list((store.root / "scratch").iterdir())


def _spares(store):
    return sorted(p.name for p in (store.root / "scratch").iterdir() if p.name.startswith("spare."))


def test_a_retired_file_is_overwritten_in_place_by_the_next_write_of_its_size(tmp_path):
    store = Store(tmp_path / "w")
    for v in (0, 1):
        store.write_unit("layers.0", v, {"w": torch.randn(64, 64)})
    store.write_scratch("input.0", torch.randn(8, 64), "inputs")
    old = store.unit_path("layers.0", 0).stat().st_ino
    store.retire_unit("layers.0", 0, 1)
    store.retire_scratch("input.0")
    assert not store.unit_path("layers.0", 0).exists() and len(_spares(store)) == 2

    new = {"w": torch.randn(64, 64)}
    store.write_unit("layers.0", 2, new)  # takes the spare of its size, not the input's
    assert store.unit_path("layers.0", 2).stat().st_ino == old and len(_spares(store)) == 1
    assert torch.equal(store.read_unit("layers.0", 2)["w"], new["w"])
    store.write_unit("layers.1", 0, {"w": torch.randn(32, 64)})  # no spare of its size: a new file
    assert len(_spares(store)) == 1
    x = torch.randn(8, 64)
    store.write_scratch("grad.s1", x, "grads")  # the retired input's size: its file
    assert _spares(store) == [] and torch.equal(store.read_scratch("grad.s1", "grads"), x)

    # a unit kept in RAM is written at syncs only: the journal goes from version 2 to 12
    store.write_unit("layers.0", 12, {"w": torch.randn(64, 64)})
    store.retire_unit("layers.0", 2, 12)
    assert len(_spares(store)) == 1
    # a file that grew (an optimizer's state added) leaves none of the old size behind
    store.write_unit("layers.0", 13, {"w": torch.randn(64, 64), "optim.c": torch.zeros(4096)})
    store.retire_unit("layers.0", 12, 13)
    assert len(_spares(store)) == 1 and not store.unit_path("layers.0", 12).exists()
    store.retire_unit("layers.0", 1, 13)
    store.close()  # spares go with the process that kept them
    assert _spares(store) == []


def test_spares_of_one_size_are_bounded_and_a_crash_leaves_none(tmp_path, monkeypatch):
    monkeypatch.setattr("slowft.store.SPARES", 2)
    store = Store(tmp_path / "w")
    for v in range(4):
        store.write_unit("layers.0", v, {"w": torch.randn(16, 16)})
    for v in range(4):
        store.retire_unit("layers.0", v, v + 1)
    assert len(_spares(store)) == 2 and not list((store.root / "units").iterdir())
    store._spares.clear()  # as after a crash: the files stay behind
    store.close()
    store = Store(tmp_path / "w")
    store.collect_garbage({}, set())
    assert _spares(store) == []
