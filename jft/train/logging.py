"""What a run writes for people: ``metrics.jsonl``, TensorBoard events, plots and a summary.

Only process 0 writes (a :class:`MetricWriter` made elsewhere does nothing), so
a run on many hosts leaves one copy of each file.

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": 10,
"train/loss": 0.31, "train/lr": 0.001, ...}``; train and eval metrics of the
same step share a line. On resume from step ``s`` the lines after ``s`` (written
by the killed run after its last checkpoint) are dropped first, so the file has
no step missing or repeated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MetricWriter", "format_table", "read_metrics", "write_plots", "write_stage_plots"]


def _scalar(value: Any) -> float | int | None:
    arr = np.asarray(value)
    if arr.ndim:
        return None
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    return float(arr)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line cut off by a kill is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

    Args:
      workdir: the run's folder.
      enabled: False on every process but 0: then nothing is written.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._tb = None
        self._pending: dict[str, Any] = {}
        self._pending_step: int | None = None

    def truncate(self, step: int) -> None:
        """Drops the records after ``step`` (and any cut-off line): the resume point."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", -1)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar ``metrics`` at ``step``; non-scalars are left out of the file."""
        if not self.enabled:
            return
        if self._pending_step is not None and self._pending_step != step:
            self.flush()
        self._pending_step = step
        for key, value in metrics.items():
            v = _scalar(value)
            if v is not None:
                self._pending[key] = v

    def flush(self) -> None:
        """Writes the pending record of the current step."""
        if not self.enabled or self._pending_step is None:
            return
        record = {"step": self._pending_step, **self._pending}
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        tb = self._writer()
        for key, value in self._pending.items():
            if isinstance(value, float) and not math.isfinite(value):
                continue
            tb.add_scalar(key, value, self._pending_step)
        self._pending, self._pending_step = {}, None

    def _writer(self):
        if self._tb is None:
            SummaryWriter = _import_summary_writer()
            self._tb = SummaryWriter(os.path.join(self.workdir, "tb"), flush_secs=30)
        return self._tb

    def close(self) -> None:
        """Flushes and closes the files."""
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _import_summary_writer():
    # tensorboardX imports torch, when it is installed, only to accept torch tensors
    # as values; jft logs Python floats. That import is ~6 CPU seconds, a quarter of a
    # short run: hide torch while tensorboardX loads (unless torch is loaded already).
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts, strict=True)
    return np.asarray(steps), np.asarray(values, dtype=float)


def _smoothing(n: int) -> float:
    # Fewer logged points need less smoothing, or the curve lags the data.
    return 0.5 if n <= 30 else 0.8 if n <= 300 else 0.9


def _smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """A debiased exponential moving average (TensorBoard's smoothing); NaN/Inf are skipped."""
    weight = _smoothing(len(values)) if weight is None else weight
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            last = weight * last + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out[i] = last / norm if norm else np.nan
    return out


def _label_last(ax: Any, steps: np.ndarray, values: np.ndarray, color: str) -> None:
    """Writes the last value of a curve beside its last point, in the curve's color."""
    ax.annotate(
        f"{values[-1]:.3f}",
        (steps[-1], values[-1]),
        textcoords="offset points",
        xytext=(4, 0),
        fontsize=8,
        color=color,
    )


def write_plots(
    workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]] | None = None
) -> list[str]:
    """Writes ``plots/loss.png``, ``plots/lr.png`` and ``plots/eval.png`` of a run.

    The loss plot shows the raw train loss, its exponential moving average and
    the eval loss on a log scale; the eval plot shows every eval metric in
    ``[0, 1]`` (accuracy, F1, ...) against the step. Returns the files written.
    """
    from matplotlib.figure import Figure

    workdir = os.fspath(workdir)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl")) if records is None else records
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    keys = sorted({k for r in records for k in r} - {"step"})

    def save(fig, name):
        path = os.path.join(out_dir, name)
        # Fixed margins: tight_layout costs one more draw (a quarter of the plotting).
        fig.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.9)
        fig.savefig(path, dpi=110)
        written.append(path)

    s, v = _series(records, "train/loss")
    if len(s):
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.plot(s, v, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        ax.plot(
            s, _smooth(v), color="tab:blue", lw=2, label=f"train loss (EMA {_smoothing(len(v))})"
        )
        es, ev = _series(records, "eval/loss")
        if len(es):
            ax.plot(es, ev, "o-", color="tab:orange", lw=2, label="eval loss")
        if np.all(v[np.isfinite(v)] > 0):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        save(fig, "loss.png")

    lr_keys = [k for k in keys if k.startswith("train/lr")]
    if lr_keys:
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        for k in lr_keys:
            ls, lv = _series(records, k)
            ax.plot(ls, lv, lw=2, label=k.removeprefix("train/"))
        ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        if len(lr_keys) > 1:
            ax.legend()
        save(fig, "lr.png")

    eval_keys = [k for k in keys if k.startswith("eval/") and k != "eval/loss"]
    if eval_keys:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for k in eval_keys:
            es, ev = _series(records, k)
            if len(ev) and np.nanmax(ev) <= 1.0 and np.nanmin(ev) >= 0.0:
                (line,) = ax.plot(es, ev, "o-", lw=2, ms=4, label=k.removeprefix("eval/"))
                _label_last(ax, es, ev, line.get_color())
        ax.set(xlabel="step", ylabel="metric", title="Eval metrics", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        save(fig, "eval.png")
    return written


def write_stage_plots(workdir: str | os.PathLike, stages: Sequence[str]) -> str:
    """Writes ``plots/stages.png``: train loss and eval accuracy of every stage of a staged run.

    Each stage is drawn against its own steps (every stage starts at step 0),
    so stages with the same budget compare directly; returns the file written.
    """
    from matplotlib.figure import Figure

    workdir = os.fspath(workdir)
    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name in stages:
        records = read_metrics(os.path.join(workdir, name, "metrics.jsonl"))
        s, v = _series(records, "train/loss")
        if len(s):
            (line,) = ax_loss.plot(s, _smooth(v), lw=2, label=name)
            es, ev = _series(records, "eval/accuracy")
            if len(es):
                ax_acc.plot(es, ev, "o-", lw=2, ms=4, color=line.get_color(), label=name)
                _label_last(ax_acc, es, ev, line.get_color())
    ax_loss.set(xlabel="step", ylabel="train loss (smoothed)", title="Train loss by stage")
    ax_loss.set_yscale("log")
    ax_acc.set(xlabel="step", ylabel="eval accuracy", title="Eval accuracy by stage")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.91, wspace=0.18)
    path = os.path.join(workdir, "plots", "stages.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (numbers to 4 significant digits), as the summary prints it."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    body = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
    return "\n".join([fmt(header), line, *(fmt(r) for r in body)])
