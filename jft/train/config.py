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
from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from jft import data, models, optim
from jft.errors import JftError

__all__ = ["ConfigError", "build_optimizer", "build_rules", "default_config", "resolve"]

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
    return out


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


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainable parameters' optimizer: ``jft.optim.<name>`` with the schedule and clipping.

    Raises:
      ConfigError: an unknown optimizer or argument.
    """
    kwargs = dict(config.optimizer)
    name = kwargs.pop("name")
    factory = getattr(optim, name, None)
    standalone = [
        n
        for n in optim.__all__
        if n[0].islower() and not n.startswith("scale_by") and n != "reduce_on_plateau"
    ]
    if name not in standalone or not callable(factory):
        known = standalone
        raise ConfigError(f"unknown optimizer '{name}' (optimizer.name); known: {', '.join(known)}")
    params = inspect.signature(factory).parameters
    lr_name = next(iter(params))
    if "lr" in kwargs and lr_name != "lr":
        kwargs[lr_name] = kwargs.pop("lr")
    for key in kwargs:
        if key not in params:
            raise ConfigError(
                f"unknown config key 'optimizer.{key}' for {name}; it takes {', '.join(params)}"
            )
    if lr_name in kwargs:
        kwargs[lr_name] = _schedule(config, float(kwargs[lr_name]))
    tx = factory(**kwargs)
    if config.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
    return tx


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """The learning rate (a float or a schedule) that :func:`build_optimizer` uses."""
    lr = config.optimizer.get("lr", config.optimizer.get("learning_rate"))
    return None if lr is None else _schedule(config, float(lr))


def build_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """Partition rules: ``(regex, None)`` for each of ``config.frozen``, then everything else."""
    tx = build_optimizer(config)
    return [(r, None) for r in config.frozen] + [(".*", tx)]


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
        return models.get(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not take these config.model keys: {e}") from None
