"""``train_and_evaluate(config, workdir)``: the loop that ``jft train`` runs.

One run: build the data, the model and the partitioned optimizer from the config;
restore or initialise the state; then step, log, evaluate and checkpoint until
``config.num_steps``, with a progress bar, ``metrics.jsonl``, TensorBoard events,
plots and a summary table. A run killed at any moment and started again with the
same command continues from its last checkpoint, with the data iterator where it
was, and reaches the same final parameters bit for bit (on CPU).

A config with ``stages`` runs each named sub-config in order into
``workdir/<stage>`` and prints their results side by side (the default recipe:
pretrain, fine-tune a frozen trunk, unfreeze, and a from-scratch baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import data, peft, weights
from jft.errors import JftError
from jft.train import checkpoint as ckpt_lib
from jft.train import config as config_lib
from jft.train import distributed, losses, metrics, parallel
from jft.train.inputs import TEXT_KEYS, inputs_for
from jft.train.lock import WorkdirLock, writable_dir
from jft.train.logging import MetricWriter, format_table, write_plots, write_stage_plots
from jft.train.step import TrainState, create_train_state, make_train_step

__all__ = ["NonFiniteError", "Preempted", "evaluate", "train_and_evaluate"]


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


def _example(features: Mapping[str, Any], keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        shape, dtype = features[k]
        out[k] = np.zeros((1, *shape), dtype)
    return out


def _init_variables(model, features, inputs, seed: int) -> dict[str, Any]:
    if isinstance(inputs, str):
        example = _example(features, [inputs])
        args, kwargs = (example[inputs],), {}
    else:
        example = _example(features, [k for k in TEXT_KEYS if k in features])
        args, kwargs = (), inputs(example)
    init = jax.jit(lambda rng: model.init(rng, *args, train=False, **kwargs))
    variables = init(jax.random.PRNGKey(seed))
    return jax.tree.map(np.asarray, dict(variables))


def _pretrained(variables: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    path = config.init.path
    if ckpt_lib.is_checkpoint_dir(path):
        flat = ckpt_lib.read_params(path)
        arch = "jft"
    else:
        flat = weights.read(path)
        arch = config.init.arch or weights.infer_arch(flat)
    variables, report = weights.restore(
        variables,
        flat,
        arch,
        skip=config_lib.init_skip(config),
        strict=config.init.strict,
        source=path,
    )
    _log(f"init from {path}: {str(report).splitlines()[0]}")
    lora = config_lib.lora_config(config)
    if lora is not None:  # DoRA's magnitudes start at the norms of the weights just loaded
        variables = {**variables, "params": peft.reset_magnitudes(variables["params"], lora)}
    return variables


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


def _eval(eval_step, config, state_for_eval, info) -> dict[str, Any]:
    sums = None
    pipeline = data.get(config.data, config.data.eval_split, train=False, seed=config.seed)
    for batch in pipeline:
        out = eval_step(state_for_eval, batch)
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    if sums is None:
        return {}
    return metrics.finalize(sums)


def _scalars(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        arr = np.asarray(v)
        if arr.ndim == 0:
            out[f"{prefix}/{k}"] = arr.item()
    return out


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    distributed.initialize(config)
    workdir = os.path.abspath(workdir)
    # One writer per workdir, checked (with its writability) before anything is
    # prepared or compiled; the lock is dropped however the run ends.
    with WorkdirLock(workdir, jax.process_index()):
        if os.path.lexists(os.path.join(workdir, "checkpoints")):
            writable_dir(os.path.join(workdir, "checkpoints"), "checkpoint folder")
        return _train_locked(config, workdir)


def _train_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    is_main = jax.process_index() == 0

    info = data.info(config.data)
    compute_dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
    model = config_lib.build_model(config, info.num_classes, compute_dtype)
    config_lib.check_run(config, info, model, workdir)  # before anything is compiled or written
    rules = config_lib.build_rules(config)
    inputs = inputs_for(info.features)
    loss_fn = losses.get(config.loss.name, **{k: v for k, v in config.loss.items() if k != "name"})
    variables = _init_variables(model, info.features, inputs, config.seed)

    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode,
        async_save=config.checkpoint.async_save,
    )
    # The resume order: the workdir's own latest checkpoint (a restarted run);
    # else config.resume (continue another run's checkpoint here); else the
    # pretrained init (config.init.path); else scratch.
    restored, origin = None, "scratch"
    if ckpt.latest_step() is not None:
        template = create_train_state(variables, rules, rng=config.seed)
        restored, origin = ckpt.restore(template), f"its checkpoint at step {ckpt.latest_step()}"
    elif config.resume:
        template = create_train_state(variables, rules, rng=config.seed)
        other = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(config.resume), every=0)
        restored, origin = other.restore(template), f"config.resume={config.resume}"
        other.close()
    elif config.init.path:
        variables = _pretrained(variables, config)
        origin = f"pretrained {config.init.path}"
    if restored is not None:
        state, start = restored.state, int(restored.step)
    else:
        state, start = create_train_state(variables, rules, rng=config.seed), 0
    _log(f"{workdir}: starting at step {start} from {origin}")

    mesh = parallel.make_mesh() if config.parallel == "jit" else None
    state = parallel.place_state(state, config.parallel, mesh, fsdp=config.fsdp)
    train_step = make_train_step(
        model,
        rules,
        loss_fn,
        inputs=inputs,
        learning_rate=config_lib.learning_rate(config),
        parallel=config.parallel,
        mesh=mesh,
        fsdp=config.fsdp,
        grad_accum_steps=config.grad_accum_steps,
        compute_dtype=compute_dtype,
    )
    eval_step = metrics.make_eval_step(
        model,
        loss_fn=loss_fn,
        inputs=inputs,
        num_classes=info.num_classes,
        parallel=config.parallel,
        mesh=mesh,
    )

    writer = MetricWriter(workdir, enabled=is_main)
    writer.truncate(start)
    pipeline = data.get(config.data, config.data.train_split, train=True, seed=config.seed)
    if restored is not None and restored.data_state:
        pipeline.set_state(restored.data_state)
    it = iter(pipeline)
    config_dict = config.to_dict()

    def run_eval(step: int, *, record: bool = True) -> dict[str, Any]:
        ev = _eval(
            lambda s, b: eval_step(s, parallel.shard_batch(b, config.parallel, mesh)),
            config,
            state,
            info,
        )
        values = _scalars(ev, "eval")
        if record:
            writer.write(step, values)
        return {**values, "eval/confusion_matrix": ev.get("confusion_matrix")}

    last_eval: dict[str, Any] = {}
    train_metrics: dict[str, Any] = {}
    n = config.num_steps
    t0, steps_done = time.perf_counter(), 0
    bar = None
    if is_main and config.progress and start < n:
        from tqdm.auto import tqdm

        if importlib.util.find_spec("ipywidgets") is None:  # Jupyter without widgets: text bar
            from tqdm.std import tqdm

        bar = tqdm(total=n, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)
    preempted = False
    pending: tuple[int, Any] | None = None  # the previous step's metrics, read one step late

    def drain(pending):
        step_, m = pending
        m = jax.device_get(m)
        if int(np.asarray(m.get("nonfinite", 0))) >= config.max_nonfinite_steps:
            writer.close()
            ckpt.wait()
            latest = ckpt.latest_step()
            ckpt.close()
            # True by construction: skipped steps leave the parameters as they were and
            # a checkpoint with a non-finite parameter is never written.
            kept = (
                f"the last checkpoint, step {latest} in {ckpt.directory}, holds finite "
                "values and is kept"
                if latest is not None
                else "no checkpoint was written"
            )
            raise NonFiniteError(
                f"{config.max_nonfinite_steps} steps in a row had a NaN or Inf loss, "
                f"gradient, update or parameter (last at step {step_}); stopped: {kept} "
                "(lower optimizer.lr, set clip_grad_norm or check the init weights)"
            )
        return step_, m

    # The bar is closed however the loop ends, so an error is printed after its last redraw.
    closing = contextlib.closing(bar) if bar is not None else contextlib.nullcontext()
    with _SigTerm() as sigterm, closing:
        for step in range(start + 1, n + 1):
            batch = parallel.shard_batch(next(it), config.parallel, mesh)
            state, m = train_step(state, batch)
            steps_done += 1
            if pending is not None:
                drain(pending)
            pending = (step, m)
            last = step == n
            if step % config.log_every == 0 or last or sigterm.received:
                _, m_host = drain(pending)
                train_metrics = _scalars(m_host, "train")
                writer.write(step, train_metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_metrics.get('train/loss', float('nan')):.4g}")
            if config.eval_every and (step % config.eval_every == 0 or last):
                last_eval = run_eval(step)
            writer.flush()
            if bar is not None:
                bar.update(1)
            # The data state after this step's batch: a restore continues with the next.
            ckpt.save(
                step,
                parallel.host_state(state, config.parallel),
                data_state=pipeline.get_state(),
                config=config_dict,
                metrics={k: v for k, v in last_eval.items() if np.ndim(v) == 0},
                force=last or sigterm.received,
            )
            if sigterm.received and not last:
                preempted = True
                break
        if pending is not None:
            drain(pending)
    elapsed = time.perf_counter() - t0
    if start >= n and config.eval_every:
        # A finished run restarted (or killed after its final checkpoint): report its
        # results again, but its metrics.jsonl already holds step n's evaluation.
        last_eval = run_eval(n, record=False)
    ckpt.wait()
    ckpt.close()
    writer.close()
    if is_main:
        write_plots(workdir)

    final_step = int(jax.device_get(parallel.host_state(state, config.parallel).step))
    result = {
        "step": final_step,
        **train_metrics,
        **{k: v for k, v in last_eval.items() if np.ndim(v) == 0},
        "steps_per_sec": steps_done / elapsed if steps_done and elapsed > 0 else float("nan"),
        "workdir": workdir,
    }
    if "eval/confusion_matrix" in last_eval and last_eval["eval/confusion_matrix"] is not None:
        result["confusion_matrix"] = np.asarray(last_eval["eval/confusion_matrix"])
    if preempted:
        result["preempted"] = Preempted(final_step)
        _log(
            f"SIGTERM: saved a checkpoint at step {final_step} in {workdir}; "
            "run the same command to resume"
        )
    elif is_main:
        shown = ("train/loss", "eval/loss", "eval/accuracy", "eval/top_5", "eval/f1")
        rows = [[k, result[k]] for k in shown if k in result]
        rows.append(["steps/s", result["steps_per_sec"]])
        print(format_table([["step", final_step], *rows], ["metric", "value"]), flush=True)
    return result


def _run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    # The first stage's distributed settings start JAX's runtime, as its run would.
    distributed.initialize(config.get(config.stages[0]) or config)
    with WorkdirLock(workdir, jax.process_index()):
        return _run_stages_locked(config, workdir)


def _run_stages_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    results = {}
    for name in config.stages:
        if name not in config:
            raise config_lib.ConfigError(
                f"config.stages names '{name}', but config.{name} is missing"
            )
        sub = ml_collections.ConfigDict(config[name].to_dict())
        init = sub.get("init", {}).get("path", "")
        if init.startswith("stage:"):
            ref = init.removeprefix("stage:")
            if ref not in results:
                raise config_lib.ConfigError(
                    f"config.{name}.init.path names stage '{ref}', which does not run before it"
                )
            sub.init.path = os.path.join(workdir, ref)
        _log(f"\n== stage {name}: {sub.get('description', '')}")
        results[name] = _train(config_lib.resolve(sub), os.path.join(workdir, name))
        if "preempted" in results[name]:
            return results
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                config[name].get("description", ""),
                r.get("step", 0),
                r.get("eval/accuracy", float("nan")),
                r.get("eval/loss", float("nan")),
            ]
        )
    table = format_table(rows, ["stage", "what", "steps", "eval accuracy", "eval loss"])
    if jax.process_index() == 0:
        print("\n" + table, flush=True)
        write_stage_plots(workdir, list(results))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(
                {
                    k: {m: v for m, v in r.items() if isinstance(v, float | int | str)}
                    for k, r in results.items()
                },
                f,
                indent=1,
            )
    return results


def train_and_evaluate(
    config: Mapping[str, Any] | ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Trains and evaluates ``config`` in ``workdir``; what ``jft train`` runs.

    Starts from, in this order: the workdir's own latest checkpoint; else
    ``config.resume``; else the pretrained weights at ``config.init.path``; else
    scratch. SIGTERM saves a checkpoint and returns (with ``"preempted"`` in the
    result); the same call then resumes.

    Args:
      config: a config of :func:`jft.train.config.default_config`'s keys (a recipe's
        ``get_config()``), or a staged config (``config.stages``).
      workdir: where checkpoints, ``metrics.jsonl``, ``tb/`` and ``plots/`` go.

    Returns:
      The final metrics (``eval/accuracy``, ``train/loss``, ``steps_per_sec``...);
      for a staged config, a dict of them by stage.

    Raises:
      jft.train.ConfigError, jft.data.DataError, jft.weights.WeightsError,
      jft.train.CheckpointError: a user mistake, with a one-line message.
      NonFiniteError: ``config.max_nonfinite_steps`` steps in a row had NaN/Inf
        gradients.
    """
    if config.get("program") == "quadratic":
        from jft.train.quadratic import run_quadratic

        return run_quadratic(ml_collections.ConfigDict(config), os.fspath(workdir))
    if "stages" in config and config["stages"]:
        config = ml_collections.ConfigDict(config)
        config_lib.validate_stages(config)  # every stage, before the first one runs
        return _run_stages(config, os.fspath(workdir))
    return _train(config_lib.resolve(config), os.fspath(workdir))


def evaluate(workdir: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """Evaluates a run's checkpoint on its eval split, with the config stored in it.

    Args:
      workdir: a run's folder (or its ``checkpoints`` folder).
      step: the checkpoint to evaluate; the latest by default.

    Returns:
      The eval metrics (``accuracy``, ``loss``, ``f1``, ``confusion_matrix``...).
    """
    directory = ckpt_lib.checkpoint_dir(workdir)
    stored = ckpt_lib.read_config(directory, step=step)
    config = config_lib.resolve(stored)
    info = data.info(config.data)
    model = config_lib.build_model(config, info.num_classes)
    rules = config_lib.build_rules(config)
    inputs = inputs_for(info.features)
    variables = _init_variables(model, info.features, inputs, config.seed)
    template = create_train_state(variables, rules, rng=config.seed)
    ck = ckpt_lib.Checkpointer(directory, every=0)
    restored = ck.restore(template, step=step)
    ck.close()
    loss_fn = losses.get(config.loss.name, **{k: v for k, v in config.loss.items() if k != "name"})
    eval_step = metrics.make_eval_step(
        model, loss_fn=loss_fn, inputs=inputs, num_classes=info.num_classes, parallel="none"
    )
    state: TrainState = restored.state
    out = _eval(eval_step, config, state, info)
    out["step"] = int(restored.step)
    return out
