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


class RunBar:
    """One bar for the whole run on a terminal: steps done, the run's ETA, and the last step's
    loss, tokens/s and the SSD written so far; the step in hand's progress as its description.
    Not on a log file: there the step lines are the record (``active`` is False)."""

    def __init__(self, total: int, initial: int, stream=None):
        stream = stream or sys.stderr
        self.active = stream.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True) if self.active else None

    def step(self, status: str) -> None:
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(1)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepProgress:
    """Where a long step is: phase, unit k of n, micro-batch j of K, and the step's ETA, from the
    share of its work done (a backward unit costs about three forward ones: recompute, then
    backpropagate). On a terminal in the run's bar (or a line redrawn in place), a line every 30 s
    in a log file."""

    def __init__(self, n_layers: int, stream=None, bar: RunBar | None = None):
        self.n_layers, self.stream = n_layers, stream or sys.stderr
        self.bar = bar if bar is not None and bar.active else None
        self.tty = self.bar is not None or self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def begin(self, step: int) -> None:
        self.step, self.start = step, time.monotonic()

    def __call__(self, phase: str, k: int, n: int, j: int, n_micro: int) -> None:
        now = time.monotonic()
        if now - self.last < (0.5 if self.tty else LOG_EVERY_S):
            return
        self.last = now
        fwd = self.n_layers + 1
        done = (k * n_micro + j) * (1 if phase == "forward" else 3) + (0 if phase == "forward" else fwd * n_micro)
        n_bwd = n if phase == "backward" else self.n_layers + 2
        total = fwd * n_micro + 3 * n_bwd * n_micro
        share = min(1.0, done / max(1, total))
        eta = (now - self.start) * (1 - share) / share if share > 0 else float("nan")
        text = (f"step {self.step}: {phase} unit {k + 1}/{n}, micro-batch {j + 1}/{n_micro}, "
                f"{share:.0%}, step ETA {_duration(eta)}")
        if self.bar is not None:
            self.bar.describe(text)
        elif self.tty:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
            self.shown = True
        else:
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        """Before the step's own line: the progress line goes."""
        if self.shown:
            print("\r\x1b[K", end="", file=self.stream, flush=True)
            self.shown = False


def _duration(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
