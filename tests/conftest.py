"""Shared fixtures: tiny llama2 folders in Meta's exact format, made once per session."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers and peft read the tests' own folders: never the network


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keeps the default work-dir cache away from the user's ~/.cache."""
    os.environ["SLOWFT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name, **make_tiny kwargs) -> folder; each distinct model is made once."""
    from slowft.tiny import make_tiny

    made: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = make_tiny(tmp_path_factory.mktemp("model") / "llama", **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def gqa_model(tiny):
    """GQA + ffn_dim_multiplier, 2 shards: the acceptance shape for numerics."""
    return tiny(dim=64, layers=3, heads=4, kv_heads=2, shards=2, ffn_mult=1.3, multiple_of=32)


def open_model(src, wd, **kw):
    """An OffloadedModel on ``src`` imported into ``wd``, on the CPU, with OffloadedModel's own
    settings (``io=`` an IOWorker made to order: delayed or synchronous)."""
    import torch

    import slowft
    from slowft.offloaded import OffloadedModel
    from slowft.store import Store

    slowft.load(src, workdir=wd, device="cpu", progress=False).close()  # import once
    return OffloadedModel(Store(wd), torch.device("cpu"), **kw)


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_script(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


PEAK_RSS = '''
import os, threading, time, psutil

def _reset_peak():
    try:  # Linux: restart the kernel's high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def _vm_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def measure_peak(fn):
    """(growth, peak): peak RSS while fn() runs, and its growth over the RSS before, in bytes
    (the kernel's high-water mark where it can be reset, else 1 ms sampling)."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    if _reset_peak():
        fn()
        return _vm_hwm() - base, _vm_hwm()
    peak, done = [base], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    t = threading.Thread(target=sample); t.start()
    try:
        fn()
    finally:
        done.set(); t.join()
    return peak[0] - base, peak[0]
'''
