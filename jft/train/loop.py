"""One training run: step, log, evaluate and checkpoint until ``config.num_steps``.

:func:`train` runs one resolved config in its workdir: it builds the
:class:`jft.train.experiment.Experiment`, starts where :func:`jft.train.resume.start`
says, then steps with a progress bar, ``metrics.jsonl``, TensorBoard events,
plots and a summary table. A run killed at any moment and started again with
the same command continues from its last checkpoint, with the data iterator
where it was, and reaches the same final parameters bit for bit (on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from jft.errors import JftError
from jft.train import checkpoint as ckpt_lib
from jft.train import config as config_lib
from jft.train import distributed, resume
from jft.train.experiment import Experiment
from jft.train.lock import WorkdirLock, writable_dir
from jft.train.logging import MetricWriter, format_table, write_plots
from jft.train.parallel import Parallel

__all__ = ["NonFiniteError", "Preempted", "train"]


class NonFiniteError(JftError, RuntimeError):
    """Too many steps in a row had a NaN or Inf loss, gradient, update or parameter.

    Such steps are skipped and no checkpoint ever holds a non-finite parameter, so
    the latest checkpoint (which the message names) is a good one.
    """


@dataclasses.dataclass
class Preempted:
    """Returned (inside the results) when SIGTERM stopped the run after a checkpoint."""

    step: int


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class _SigTerm:
    """Turns SIGTERM into a flag the loop reads between steps (main thread only)."""

    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _scalars(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        arr = np.asarray(v)
        if arr.ndim == 0:
            out[f"{prefix}/{k}"] = arr.item()
    return out


def _progress_bar(config: ml_collections.ConfigDict, start: int) -> Any:
    """A tqdm bar from ``start`` to ``config.num_steps`` on process 0, else ``None``."""
    if jax.process_index() != 0 or not config.progress or start >= config.num_steps:
        return None
    from tqdm.auto import tqdm

    if importlib.util.find_spec("ipywidgets") is None:  # Jupyter without widgets: text bar
        from tqdm.std import tqdm

    return tqdm(
        total=config.num_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5
    )


def _checkpointer(config: ml_collections.ConfigDict, workdir: str) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode,
        async_save=config.checkpoint.async_save,
        frozen_base=resume.frozen_base(config),
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates one resolved run config in ``workdir``; its final metrics.

    One writer per workdir, checked (with its writability) before anything is
    prepared or compiled; the lock is dropped however the run ends.
    """
    distributed.initialize(config)
    workdir = os.path.abspath(workdir)
    with WorkdirLock(workdir, jax.process_index()):
        if os.path.lexists(os.path.join(workdir, "checkpoints")):
            writable_dir(os.path.join(workdir, "checkpoints"), "checkpoint folder")
        exp = Experiment.build(config)
        # Before anything is compiled or written.
        config_lib.check_run(config, exp.info, exp.model, workdir)
        return _Run(exp, workdir).run()


class _Run:
    """The loop of one run, from its start to ``config.num_steps`` (or SIGTERM)."""

    def __init__(self, exp: Experiment, workdir: str):
        config = exp.config
        self.exp, self.config, self.workdir = exp, config, workdir
        self.is_main = jax.process_index() == 0
        self.ckpt = _checkpointer(config, workdir)
        start = resume.start(exp, self.ckpt)
        _log(f"{workdir}: starting at step {start.step} from {start.origin}")
        self.start = start.step
        self.par = Parallel(config.parallel, fsdp=config.fsdp)
        self.state = self.par.place_state(start.state)
        self.train_step = exp.train_step(self.par)
        self.eval_step = exp.eval_step(self.par)
        self.writer = MetricWriter(workdir, enabled=self.is_main)
        self.writer.truncate(start.step)
        self.pipeline = exp.train_data()
        if start.data_state:
            self.pipeline.set_state(start.data_state)

    def evaluate(self, step: int, *, record: bool = True) -> dict[str, Any]:
        """Evaluates the current state; logs it at ``step`` when ``record``."""
        ev = self.exp.evaluate(self.eval_step, self.state, self.par)
        values = _scalars(ev, "eval")
        if record:
            self.writer.write(step, values)
        return {**values, "eval/confusion_matrix": ev.get("confusion_matrix")}

    def drain(self, pending: tuple[int, Any]) -> tuple[int, Any]:
        """A step's metrics on the host; stops the run after too many non-finite steps."""
        step, m = pending
        m = jax.device_get(m)
        limit = self.config.max_nonfinite_steps
        if int(np.asarray(m.get("nonfinite", 0))) >= limit:
            self.writer.close()
            self.ckpt.wait()
            latest = self.ckpt.latest_step()
            self.ckpt.close()
            # True by construction: skipped steps leave the parameters as they were and
            # a checkpoint with a non-finite parameter is never written.
            kept = (
                f"the last checkpoint, step {latest} in {self.ckpt.directory}, holds finite "
                "values and is kept"
                if latest is not None
                else "no checkpoint was written"
            )
            raise NonFiniteError(
                f"{limit} steps in a row had a NaN or Inf loss, "
                f"gradient, update or parameter (last at step {step}); stopped: {kept} "
                "(lower optimizer.lr, set clip_grad_norm or check the init weights)"
            )
        return step, m

    def run(self) -> dict[str, Any]:
        """Steps to ``config.num_steps``, then closes everything; the final metrics."""
        config, n = self.config, self.config.num_steps
        last_eval: dict[str, Any] = {}
        train_metrics: dict[str, Any] = {}
        t0, steps_done = time.perf_counter(), 0
        preempted = False
        pending: tuple[int, Any] | None = None  # the previous step's metrics, read one step late
        config_dict = config.to_dict()
        it = iter(self.pipeline)
        bar = _progress_bar(config, self.start)
        # The bar is closed however the loop ends, so an error is printed after its last redraw.
        closing = contextlib.closing(bar) if bar is not None else contextlib.nullcontext()
        with _SigTerm() as sigterm, closing:
            for step in range(self.start + 1, n + 1):
                self.state, m = self.train_step(self.state, self.par.shard_batch(next(it)))
                steps_done += 1
                if pending is not None:
                    self.drain(pending)
                pending = (step, m)
                last = step == n
                if step % config.log_every == 0 or last or sigterm.received:
                    _, m_host = self.drain(pending)
                    train_metrics = _scalars(m_host, "train")
                    self.writer.write(step, train_metrics)
                    if bar is not None:
                        loss = train_metrics.get("train/loss", float("nan"))
                        bar.set_postfix(loss=f"{loss:.4g}")
                if config.eval_every and (step % config.eval_every == 0 or last):
                    last_eval = self.evaluate(step)
                self.writer.flush()
                if bar is not None:
                    bar.update(1)
                # The data state after this step's batch: a restore continues with the next.
                self.ckpt.save(
                    step,
                    self.par.host_state(self.state),
                    data_state=self.pipeline.get_state(),
                    config=config_dict,
                    metrics={k: v for k, v in last_eval.items() if np.ndim(v) == 0},
                    force=last or sigterm.received,
                )
                if sigterm.received and not last:
                    preempted = True
                    break
            if pending is not None:
                self.drain(pending)
        elapsed = time.perf_counter() - t0
        if self.start >= n and config.eval_every:
            # A finished run restarted (or killed after its final checkpoint): report its
            # results again, but its metrics.jsonl already holds step n's evaluation.
            last_eval = self.evaluate(n, record=False)
        self.ckpt.wait()
        self.ckpt.close()
        self.writer.close()
        if self.is_main:
            write_plots(self.workdir)
        rate = steps_done / elapsed if steps_done and elapsed > 0 else float("nan")
        return self._result(train_metrics, last_eval, rate, preempted)

    def _result(
        self, train_metrics: dict, last_eval: dict, rate: float, preempted: bool
    ) -> dict[str, Any]:
        """The run's final metrics, printed as a table (or the SIGTERM line)."""
        final_step = int(jax.device_get(self.par.host_state(self.state).step))
        result = {
            "step": final_step,
            **train_metrics,
            **{k: v for k, v in last_eval.items() if np.ndim(v) == 0},
            "steps_per_sec": rate,
            "workdir": self.workdir,
        }
        if last_eval.get("eval/confusion_matrix") is not None:
            result["confusion_matrix"] = np.asarray(last_eval["eval/confusion_matrix"])
        if preempted:
            result["preempted"] = Preempted(final_step)
            _log(
                f"SIGTERM: saved a checkpoint at step {final_step} in {self.workdir}; "
                "run the same command to resume"
            )
        elif self.is_main:
            shown = ("train/loss", "eval/loss", "eval/accuracy", "eval/top_5", "eval/f1")
            rows = [[k, result[k]] for k in shown if k in result]
            rows.append(["steps/s", result["steps_per_sec"]])
            print(format_table([["step", final_step], *rows], ["metric", "value"]), flush=True)
        return result
