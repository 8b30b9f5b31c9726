"""The checks of a resolved run config: its values alone, then against the data, model and workdir.

:func:`validate` needs nothing but the config, so it runs when the config is
resolved; :func:`check_run` needs the data set's sizes and the model's
parameters, and runs once they are known. Both run before anything is compiled
or written, and raise :class:`~jft.train.defaults.ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections
import numpy as np

from jft import data, partition, peft
from jft.errors import JftError
from jft.train import losses
from jft.train.build import build_model, build_rules, lora_config
from jft.train.defaults import EVAL_METRICS, ConfigError
from jft.train.inputs import inputs_for, model_args

__all__ = ["check_run", "validate"]


def _need(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' is {value!r}; it must be {expected}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every value of a resolved run config, without touching data, files or devices.

    :func:`resolve` calls it, so a mistake is reported in the time it takes to
    import jft, before any data is prepared, anything is compiled or written.
    The optimizer, the schedule's learning rate and the loss are built here, so
    their own checks run (``momentum=1.5``, ``b1=1.0``, an unknown loss). With
    LoRA, its targets are traced against the model on the inputs that the data
    set's code declares (:func:`jft.data.preview`), before the data are prepared.

    Raises:
      ConfigError: one line naming the key, its value and what it must be.
      jft.data.DataError: a bad ``config.data`` key.
    """
    c = config
    for key in ("log_every", "grad_accum_steps", "max_nonfinite_steps", "checkpoint.keep"):
        group, _, leaf = key.rpartition(".")
        value = (c[group] if group else c)[leaf]
        # max_nonfinite_steps=1 stops at the first non-finite step; 0 would stop a healthy run.
        _need(value >= 1, key, value, "an integer >= 1")
    for key in ("eval_every", "checkpoint.every", "schedule.warmup_steps"):
        group, _, leaf = key.rpartition(".")
        value = (c[group] if group else c)[leaf]
        _need(value >= 0, key, value, "an integer >= 0 (0: never)" if "every" in key else ">= 0")
    _need(
        _finite_number(c.clip_grad_norm) and c.clip_grad_norm >= 0,
        "clip_grad_norm",
        c.clip_grad_norm,
        "a finite number >= 0 (0: no clipping)",
    )
    _need(
        _finite_number(c.schedule.end_factor) and c.schedule.end_factor >= 0,
        "schedule.end_factor",
        c.schedule.end_factor,
        "a finite number >= 0",
    )
    d = data.config.resolve(c.data)
    _need(d["num_workers"] >= 0, "data.num_workers", d["num_workers"], ">= 0 (0: no threads)")
    _need(d["prefetch"] >= 1, "data.prefetch", d["prefetch"], ">= 1")
    if d["batch_size"] % c.grad_accum_steps:
        raise ConfigError(
            f"config key 'grad_accum_steps' is {c.grad_accum_steps}, which does not divide "
            f"data.batch_size={d['batch_size']}; choose a divisor of the batch size"
        )
    _check_loss(c)
    lora_config(c)  # a LoraError names the lora.* key
    _check_rules(c)
    best = c.checkpoint.best_metric
    if best and best not in EVAL_METRICS:
        raise ConfigError(
            f"config key 'checkpoint.best_metric' is {best!r}, which the evaluation does not "
            f"report; choose one of {', '.join(EVAL_METRICS)} (or '' for the latest)"
        )
    if lora_config(c) is not None:
        _check_lora_fit(c)


def _check_lora_fit(c: ml_collections.ConfigDict) -> None:
    """``lora.targets`` against the model, traced on the inputs the data's code declares.

    Before the data set is prepared or the workdir made (:func:`jft.data.preview`);
    where the features are not known yet, the run's own init finds a bad target.
    """
    try:
        described = data.preview(c.data)
        if described is None:
            return
        model = build_model(c, described.num_classes)
    except JftError:
        return  # reported, in one line, where the data set and the model are built
    example = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in described.features.items()}
    args, kwargs = model_args(inputs_for(described.features), example)
    peft.check_targets(model, *args, train=False, **kwargs)


def _check_loss(c: ml_collections.ConfigDict) -> None:
    kwargs = {k: v for k, v in c.loss.items() if k != "name"}
    losses.LOSSES.get(c.loss.name, key="config key 'loss.name'", error=ConfigError)
    smoothing = kwargs.get("label_smoothing", 0.0)
    _need(
        _finite_number(smoothing) and 0 <= smoothing < 1,
        "loss.label_smoothing",
        smoothing,
        "in [0, 1) (0: none)",
    )
    try:
        losses.get(c.loss.name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"config key 'loss': {e}") from None


def _check_rules(c: ml_collections.ConfigDict) -> None:
    """``frozen``, ``rules`` and ``layerwise_lr``: their regexes, values and optimizers."""
    regexes = [("frozen", r) for r in c.frozen] + [
        (f"rules[{i}]", r) for i, (r, _) in enumerate(c.rules)
    ]
    for key, regex in regexes:
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config key '{key}' has an invalid regex {regex!r}: {e}") from None
    lw = c.layerwise_lr
    _need(
        _finite_number(lw.decay) and 0 < lw.decay <= 1,
        "layerwise_lr.decay",
        lw.decay,
        "in (0, 1] (1: off)",
    )
    if lw.decay != 1:
        _need(
            isinstance(lw.num_layers, int) and lw.num_layers >= 1,
            "layerwise_lr.num_layers",
            lw.num_layers,
            "the model's number of transformer blocks (>= 1) when layerwise_lr.decay < 1",
        )
    lora = lora_config(c) is not None
    if lora and (c.rules or lw.decay != 1):
        raise ConfigError(
            "config keys 'rules' and 'layerwise_lr' do not combine with LoRA (lora.targets), "
            "which trains the adapters and lora.modules_to_save with config.optimizer"
        )
    build_rules(c)  # builds every group's optimizer, so its own checks run


def check_run(config: ml_collections.ConfigDict, info: Any, model: Any, workdir: str) -> None:
    """The checks that need the data set's sizes, the model's parameters or the workdir.

    Run once the data source is open and the model is built, before anything is
    compiled or written: the batch against the split, the frozen rules against
    the parameters (traced with ``jax.eval_shape``, not compiled), the best
    metric against the classes, and ``num_steps`` against a checkpoint already
    in ``workdir``.

    Raises:
      ConfigError: one line naming the key and what to do.
    """
    split = config.data.train_split
    n = info.num_examples.get(split)
    if n is not None and config.data.batch_size > n:
        raise ConfigError(
            f"config key 'data.batch_size' is {config.data.batch_size}, but the train split "
            f"{split!r} of {info.name} has {n} examples; set data.batch_size <= {n}"
        )
    _check_devices(config)
    if config.checkpoint.best_metric == "eval/top_5" and (info.num_classes or 0) < 5:
        raise ConfigError(
            f"config key 'checkpoint.best_metric' is 'eval/top_5', but {info.name} has "
            f"{info.num_classes} classes, so the evaluation does not report it; use eval/accuracy"
        )
    if config.frozen or config.rules or config.layerwise_lr.decay != 1:
        _check_rules_fit(config, info, model)
    steps = _checkpoint_steps(os.path.join(workdir, "checkpoints"))
    if steps and steps[-1] > config.num_steps:
        raise ConfigError(
            f"config key 'num_steps' is {config.num_steps}, but {workdir}/checkpoints already "
            f"holds step {steps[-1]}; set num_steps >= {steps[-1]} to continue that run, "
            "or use a new workdir"
        )


def _check_devices(config: ml_collections.ConfigDict) -> None:
    """Each process's batches must divide among its devices (and, under pmap, into microbatches)."""
    if config.parallel == "none":
        return
    import jax

    devices, processes = jax.local_device_count(), jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        rows = config.data[key] // processes
        if rows % devices:
            raise ConfigError(
                f"config key 'data.{key}' is {config.data[key]}: {rows} rows per process do not "
                f"divide among its {devices} devices (parallel={config.parallel!r}); use a "
                f"multiple of {devices * processes}"
            )
    per_device = config.data.batch_size // processes // devices
    if config.parallel == "pmap" and per_device % config.grad_accum_steps:
        raise ConfigError(
            f"config key 'grad_accum_steps' is {config.grad_accum_steps}, which does not divide "
            f"the {per_device} rows per device under pmap; choose a divisor of {per_device}"
        )


def _checkpoint_steps(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(d) for d in names if d.isdigit() and os.path.isdir(f"{directory}/{d}"))


def _check_rules_fit(config: ml_collections.ConfigDict, info: Any, model: Any) -> None:
    """The partition rules against the model's parameter paths (traced, never compiled)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from jft.train.inputs import TEXT_KEYS, inputs_for

    example = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in info.features.items()}
    inputs = inputs_for(info.features)
    if isinstance(inputs, str):
        args, kwargs = (example[inputs],), {}
    else:
        args, kwargs = (), inputs({k: v for k, v in example.items() if k in TEXT_KEYS})
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), *args, train=False, **kwargs)
    )  # traced, never compiled
    paths = list(traverse_util.flatten_dict(dict(shapes.get("params", {})), sep="/"))
    rules = [re.compile(r) for r in config.frozen]
    frozen = [p for p in paths if any(r.fullmatch(p) for r in rules)]
    for regex, rule in zip(config.frozen, rules, strict=True):
        if not any(rule.fullmatch(p) for p in paths):
            raise ConfigError(
                f"config key 'frozen' has {regex!r}, which matches no parameter of "
                f"{config.model.name} (e.g. {', '.join(paths[:3])}); fix or remove it"
            )
    if paths and len(frozen) == len(paths):
        raise ConfigError(
            f"config key 'frozen' = {tuple(config.frozen)} freezes all {len(paths)} parameters "
            f"of {config.model.name}: nothing left to train; narrow it (e.g. 'backbone/.*')"
        )
    if lora_config(config) is not None:
        return  # LoRA's adapters come with its own rules
    lw = config.layerwise_lr
    if lw.decay != 1:
        blocks = re.compile(re.escape(lw.layer_prefix) + r"(\d+)/")
        found = {m.group(1) for p in paths if (m := blocks.match(p))}
        if len(found) != lw.num_layers:
            raise ConfigError(
                f"config key 'layerwise_lr.num_layers' is {lw.num_layers}, but "
                f"{config.model.name} has {len(found)} blocks under "
                f"layerwise_lr.layer_prefix={lw.layer_prefix!r}; set it to {len(found)}"
                + ("" if found else " or fix the prefix")
            )
    try:
        partition.labels(dict(shapes.get("params", {})), build_rules(config))
    except partition.PartitionError as e:
        raise ConfigError(
            f"the partition rules (config keys frozen, rules, layerwise_lr) do not fit "
            f"{config.model.name}: {e}"
        ) from None
