"""The run's loss plot: ``out/<model>/loss.png``, drawn from its ``metrics.jsonl``.

Training loss (each step, and smoothed), held-out loss at each evaluation, against steps (the
tokens trained on along the top) and the learning rate on a second axis. matplotlib with its
Agg backend: no display needed. Written whole to a temp file and renamed, like every file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from .atomic import write_bytes_atomic

SMOOTHING = 0.9  # the exponential moving average's weight on the past


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training steps, evaluations) from a metrics.jsonl."""
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (evals if "eval_loss" in record else steps).append(record)
    return steps, evals


def smoothed(values: list[float]) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else SMOOTHING * avg + (1 - SMOOTHING) * v
        out.append(avg)
    return out


def write_loss_plot(metrics: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if steps:
        x = [r["step"] for r in steps]
        loss = [r["loss"] for r in steps]
        ax.plot(x, loss, color="tab:blue", alpha=0.3, lw=1, label="training loss")
        ax.plot(x, smoothed(loss), color="tab:blue", lw=2, label="training loss, smoothed")
        lr_ax = ax.twinx()
        lr_ax.plot(x, [r["lr"] for r in steps], color="tab:gray", ls=":", lw=1)
        lr_ax.set_ylabel("learning rate (dotted)", color="tab:gray")
        per_step = steps[-1].get("tokens", 0)
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step))
            top.set_xlabel("tokens trained on (millions)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(png, buf.getvalue())
    return png
