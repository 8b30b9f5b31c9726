"""The run configuration: every key :func:`jft.train.train_and_evaluate` reads, with defaults.

A recipe (``configs/<name>.py``) returns a ``ml_collections.ConfigDict`` that
names only what it changes; :func:`resolve` lays it over :func:`default_config`
and refuses keys that do not exist, so a typo (``optimizer.lrr``) is a one-line
:class:`ConfigError` rather than a silently ignored setting. ``model`` and
``optimizer`` are open: their keys besides ``name`` are the keyword arguments of
``jft.models.get(name, ...)`` and ``jft.optim.<name>(...)``, checked when built.

A config with ``stages`` is a pipeline: ``stages`` names sub-configs that run in
order, each into ``workdir/<stage>``, and a stage may start from an earlier one
with ``init.path = "stage:<name>"`` (see :func:`jft.train.train_and_evaluate`).
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from jft import data, models, optim, peft
from jft.errors import JftError
from jft.train import losses

__all__ = [
    "ConfigError",
    "build_optimizer",
    "build_rules",
    "init_skip",
    "lora_config",
    "check_run",
    "default_config",
    "optimizer_keys",
    "resolve",
    "validate",
    "validate_stages",
]

_OPEN = ("model", "optimizer", "distributed")


class ConfigError(JftError, ValueError):
    """A config that cannot run; the one-line message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key of a single run, with its default (the digits CNN from scratch)."""
    c = ml_collections.ConfigDict()
    c.description = ""  # what the run is, for tables
    c.seed = 0

    # Data
    c.data = data.default_config()

    # Model
    c.model = ml_collections.ConfigDict({"name": "cnn"})
    c.init = ml_collections.ConfigDict()
    c.init.path = ""  # weights file/folder, a jft workdir or checkpoint, or "stage:<name>"
    c.init.arch = ""  # key map; inferred from the file when empty
    c.init.skip = ("head/.*",)  # deliberately new parameters: keep their init values
    c.init.strict = True  # every parameter not skipped must be in the file
    c.init.required = False  # a recipe that needs pretrained weights: empty init.path is an error

    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.frozen = ()  # regexes of frozen parameters, e.g. ("backbone/.*",)
    # LoRA (jft.peft): on when lora.targets names modules; then only the adapters and
    # lora.modules_to_save train, and the rest is a frozen base.
    c.lora = ml_collections.ConfigDict()
    c.lora.targets = ()  # regexes of module paths, e.g. (r"backbone/.*attention/(query|value)",)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.variant = "lora"  # lora | rslora | dora | rsdora
    c.lora.modules_to_save = ("head",)  # module paths trained whole next to the adapters
    c.clip_grad_norm = 0.0  # 0: no clipping
    c.loss = ml_collections.ConfigDict({"name": "softmax_xent", "label_smoothing": 0.0})

    # Schedule
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "constant"  # constant | cosine | warmup_cosine | linear
    c.schedule.warmup_steps = 0
    c.schedule.end_factor = 0.0  # final lr as a fraction of the peak (cosine, linear)

    # Training
    c.num_steps = 500
    c.parallel = "jit"  # jit | pmap | none
    c.fsdp = False
    c.grad_accum_steps = 1
    c.compute_dtype = "float32"  # float32 | bfloat16
    c.max_nonfinite_steps = 10
    c.log_every = 10
    c.eval_every = 100
    c.progress = True
    c.distributed = ml_collections.ConfigDict()  # coordinator_address, num_processes, process_id

    # Checkpoints
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # 0: only at the end
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "eval/accuracy"
    c.checkpoint.best_mode = "max"
    c.checkpoint.async_save = True
    c.resume = ""  # a workdir or checkpoint folder to start from when the workdir has none
    return c


def _check_keys(given: Mapping[str, Any], default: Mapping[str, Any], prefix: str) -> None:
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in default:
            close = [k for k in default if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{name}'{hint}")
        if name in _OPEN:
            continue
        if isinstance(default[key], Mapping) and not isinstance(value, Mapping):
            raise ConfigError(f"config key '{name}' is a group of keys, not a value")
        if isinstance(default[key], Mapping):
            _check_keys(value, default[key], f"{name}.")


def _plain(config: Any) -> Any:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {k: _plain(v) for k, v in config.items()}
    return config


def resolve(config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` laid over :func:`default_config`: every key present, none unknown.

    Raises:
      ConfigError: a key that does not exist, or a value of the wrong kind.
    """
    given = _plain(config)
    given.pop("stages", None)
    out = default_config()
    _check_keys(given, out.to_dict(), "")
    for key in _OPEN:
        if key in given:
            out[key] = ml_collections.ConfigDict(given.pop(key))
    try:
        out.update(given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config value: {e}") from None
    if not out.model.get("name"):
        raise ConfigError("config key 'model.name' is required")
    if not out.optimizer.get("name"):
        raise ConfigError("config key 'optimizer.name' is required")
    for key, allowed in (
        ("parallel", ("jit", "pmap", "none")),
        ("compute_dtype", ("float32", "bfloat16")),
        ("checkpoint.best_mode", ("max", "min")),
        ("schedule.name", ("constant", "cosine", "warmup_cosine", "linear")),
    ):
        group, _, leaf = key.rpartition(".")
        value = (out[group] if group else out)[leaf]
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {allowed}")
    if out.init.required and not out.init.path:
        raise ConfigError(
            "this recipe needs pretrained weights: set config.init.path "
            "(or pass the file as the config argument, configs/X.py:/path/to/weights)"
        )
    if out.num_steps < 1:
        raise ConfigError(f"config key 'num_steps' must be >= 1, got {out.num_steps}")
    validate(out)
    return out


# The scalar metrics the eval step reports (``top_5`` when there are >= 5 classes).
EVAL_METRICS = (
    "eval/accuracy",
    "eval/f1",
    "eval/loss",
    "eval/precision",
    "eval/recall",
    "eval/top_5",
)


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
    their own checks run (``momentum=1.5``, ``b1=1.0``, an unknown loss).

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
    _check_lr(c)
    build_optimizer(c)
    lora_config(c)  # a LoraError names the lora.* key
    for regex in c.frozen:
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config key 'frozen' has an invalid regex {regex!r}: {e}") from None
    best = c.checkpoint.best_metric
    if best and best not in EVAL_METRICS:
        raise ConfigError(
            f"config key 'checkpoint.best_metric' is {best!r}, which the evaluation does not "
            f"report; choose one of {', '.join(EVAL_METRICS)} (or '' for the latest)"
        )


def _check_loss(c: ml_collections.ConfigDict) -> None:
    kwargs = {k: v for k, v in c.loss.items() if k != "name"}
    if c.loss.name not in losses.names():
        raise ConfigError(
            f"config key 'loss.name' is {c.loss.name!r}; known: {', '.join(losses.names())}"
        )
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


def _check_lr(c: ml_collections.ConfigDict) -> None:
    # Checked here, not only by the rule: a schedule hides a bad peak from it.
    for key in ("lr", "learning_rate"):
        if key in c.optimizer:
            lr = c.optimizer[key]
            _need(
                _finite_number(lr) and lr >= 0,
                f"optimizer.{key}",
                lr,
                "a finite number >= 0 (e.g. 1e-3)",
            )


def validate_stages(config: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
    """Resolves and validates every stage of a staged config before the first one runs.

    Raises:
      ConfigError: a stage that is missing, an ``init.path = "stage:<name>"`` that
        names no earlier stage, or a mistake in any stage (prefixed with its name).
    """
    done: list[str] = []
    for name in config["stages"]:
        if name not in config:
            raise ConfigError(f"config.stages names '{name}', but config.{name} is missing")
        sub = _plain(config[name])
        init = str(sub.get("init", {}).get("path", "") or "")
        if init.startswith("stage:") and init.removeprefix("stage:") not in done:
            raise ConfigError(
                f"config.{name}.init.path names stage '{init.removeprefix('stage:')}', "
                "which does not run before it"
            )
        if init.startswith("stage:"):
            sub["init"]["path"] = ""  # a folder that exists once the earlier stage ran
        try:
            resolve(sub)
        except ConfigError as e:
            raise ConfigError(f"stage '{name}': {e}") from None
        done.append(name)


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
    if config.frozen:
        _check_frozen(config, info, model)
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


def _check_frozen(config: ml_collections.ConfigDict, info: Any, model: Any) -> None:
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


def _schedule(config: ml_collections.ConfigDict, lr: float) -> optax.ScalarOrSchedule:
    s, n = config.schedule, config.num_steps
    if s.name == "constant" and not s.warmup_steps:
        return lr
    end = lr * s.end_factor
    if s.name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, s.warmup_steps), optax.constant_schedule(lr)],
            [s.warmup_steps],
        )
    if s.name == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, s.warmup_steps),
                optax.linear_schedule(lr, end, max(1, n - s.warmup_steps)),
            ],
            [s.warmup_steps],
        )
    # cosine (no warmup) and warmup_cosine; a run shorter than its warmup just warms up.
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, s.warmup_steps, max(n, s.warmup_steps + 1), end
    )


def _rules() -> list[str]:
    """The update rules ``optimizer.name`` may name (jft.optim's standalone optimizers)."""
    return [
        n
        for n in optim.__all__
        if n[0].islower() and not n.startswith("scale_by") and n != "reduce_on_plateau"
    ]


def optimizer_keys() -> frozenset[str]:
    """Every key a ``config.optimizer`` group may hold: ``name``, ``lr`` and any rule's arguments.

    An override may set any argument of the chosen rule even when the recipe
    does not (``--config.optimizer.momentum=0.5`` for ``heavy_ball``);
    :func:`build_optimizer` then checks it against the rule that ``name`` chooses.
    """
    keys = {"name", "lr"}
    for rule in _rules():
        keys.update(inspect.signature(getattr(optim, rule)).parameters)
    return frozenset(keys)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainable parameters' optimizer: ``jft.optim.<name>`` with the schedule and clipping.

    Raises:
      ConfigError: an unknown optimizer or argument.
    """
    kwargs = dict(config.optimizer)
    name = kwargs.pop("name")
    factory = getattr(optim, name, None)
    standalone = _rules()
    if name not in standalone or not callable(factory):
        known = standalone
        raise ConfigError(f"unknown optimizer '{name}' (optimizer.name); known: {', '.join(known)}")
    params = inspect.signature(factory).parameters
    lr_name = next(iter(params))
    given = {k: k for k in kwargs}  # factory argument -> config key
    if "lr" in kwargs and lr_name != "lr":
        kwargs[lr_name] = kwargs.pop("lr")
        given[lr_name] = given.pop("lr")
    for key in kwargs:
        if key not in params:
            raise ConfigError(
                f"unknown config key 'optimizer.{key}' for {name}; it takes {', '.join(params)}"
            )
    if lr_name in kwargs:
        kwargs[lr_name] = _schedule(config, float(kwargs[lr_name]))
    try:
        tx = factory(**kwargs)
    except (TypeError, ValueError) as e:
        # The rule's own check names its argument ("momentum must be in [0, 1), got ...").
        msg = " ".join(str(e).split())
        key = next((k for k in given if msg.startswith(k) or f"{k}=" in msg), None)
        where = f"config key 'optimizer.{given[key]}'" if key else f"config.optimizer ({name})"
        raise ConfigError(f"{where}: {msg}") from None
    if config.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
    return tx


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """The learning rate (a float or a schedule) that :func:`build_optimizer` uses."""
    lr = config.optimizer.get("lr", config.optimizer.get("learning_rate"))
    return None if lr is None else _schedule(config, float(lr))


def build_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """Partition rules: ``(regex, None)`` for each of ``config.frozen``, then everything else.

    With LoRA (``config.lora.targets``), everything else is the adapters and
    ``lora.modules_to_save``, and the rest of the model is frozen.
    """
    tx = build_optimizer(config)
    frozen = [(r, None) for r in config.frozen]
    if lora_config(config) is not None:
        also = [f"{re.escape(m)}/.*" for m in config.lora.modules_to_save]
        return frozen + peft.adapter_rules(tx, also=also)
    return frozen + [(".*", tx)]


def lora_config(config: ml_collections.ConfigDict) -> peft.LoraConfig | None:
    """The :class:`jft.peft.LoraConfig` of ``config.lora``, or None when LoRA is off."""
    c = config.lora
    if not c.targets:
        return None
    return peft.LoraConfig(
        targets=tuple(c.targets), rank=c.rank, alpha=c.alpha, dropout=c.dropout, variant=c.variant
    )


def init_skip(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.init.skip``, plus the adapters when LoRA is on (no weights file holds them)."""
    skip = tuple(config.init.skip)
    return skip + (peft.ADAPTER_REGEX,) if lora_config(config) is not None else skip


def build_model(config: ml_collections.ConfigDict, num_classes: int, dtype: Any = None) -> Any:
    """``jft.models.get(config.model.name, ...)`` with ``num_classes`` unless the config sets it.

    Raises:
      ConfigError: an unknown model or argument.
    """
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    if name not in models.names():
        raise ConfigError(
            f"unknown model '{name}' (model.name); known: {', '.join(sorted(models.names()))}"
        )
    kwargs.setdefault("num_classes", num_classes)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = models.get(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not take these config.model keys: {e}") from None
    lora = lora_config(config)
    return model if lora is None else peft.lora(model, lora)
