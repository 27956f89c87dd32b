"""Progress of long work (import, export, tokenizing) in bytes: tqdm's bar on a terminal, and
where the output goes to a file (an overnight run's log) a plain line now and then, which a bar
redrawn with carriage returns would not give."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0


class _LogLines:
    def __init__(self, total: int, desc: str, initial: int = 0):
        self.total, self.desc, self.done = total, desc, initial
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= LOG_EVERY_S:
            self.last = time.monotonic()
            print(f"{self.desc}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB ({self.done / max(1, self.total):.0%})",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total: int, desc: str, initial: int = 0, enabled: bool = True, leave: bool = True):
    """A context manager whose ``update(nbytes)`` reports progress (nothing if not ``enabled``)."""
    if enabled and not sys.stderr.isatty():
        return _LogLines(total, desc, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, leave=leave, disable=not enabled)
