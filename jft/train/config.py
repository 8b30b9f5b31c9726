"""The run configuration: every key :func:`jft.train.train_and_evaluate` reads, with defaults.

A recipe (``configs/<name>.py``) returns a ``ml_collections.ConfigDict`` that
names only what it changes; :func:`resolve` lays it over :func:`default_config`
and refuses keys that do not exist, so a typo (``optimizer.lrr``) is a one-line
:class:`ConfigError` rather than a silently ignored setting. ``model`` and
``optimizer`` are open: their keys besides ``name`` are the keyword arguments of
``jft.models.get(name, ...)`` and ``jft.optim.<name>(...)``, checked when built.
``frozen``, ``rules`` and ``layerwise_lr`` give the :mod:`jft.partition` rules:
which parameters train with which optimizer settings (:func:`build_rules`).

A config with ``stages`` is a pipeline: ``stages`` names sub-configs that run in
order, each into ``workdir/<stage>``, and a stage may start from an earlier one
with ``init.path = "stage:<name>"`` (see :func:`jft.train.train_and_evaluate`).

This module resolves a config; the defaults live in :mod:`jft.train.defaults`,
the checks in :mod:`jft.train.validation` and the builders (model, optimizer,
partition rules) in :mod:`jft.train.build`. Every name stays importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jft.train import parallel
from jft.train.build import (
    build_model,
    build_optimizer,
    build_rules,
    init_skip,
    learning_rate,
    lora_config,
    optimizer_arguments,
    optimizer_keys,
)
from jft.train.defaults import EVAL_METRICS, OPEN_GROUPS, ConfigError, default_config
from jft.train.validation import check_run, validate

__all__ = [
    "EVAL_METRICS",
    "ConfigError",
    "build_model",
    "build_optimizer",
    "build_rules",
    "check_run",
    "default_config",
    "init_skip",
    "learning_rate",
    "lora_config",
    "optimizer_arguments",
    "optimizer_keys",
    "resolve",
    "validate",
    "validate_stages",
]


def _check_keys(given: Mapping[str, Any], default: Mapping[str, Any], prefix: str) -> None:
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in default:
            where = f"{prefix[:-1]} has" if prefix else "the config has"
            raise ConfigError(f"unknown config key '{name}'; {where}: {', '.join(default)}")
        if name in OPEN_GROUPS:
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


def _rules(value: Any) -> tuple[tuple[str, Any], ...]:
    """``config.rules`` as a tuple of ``(regex, settings dict or None)`` (JSON gives lists)."""
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"config key 'rules' is {value!r}; it must be a tuple of (regex, settings) pairs, "
            'e.g. (("head/.*", {"lr": 1e-2}),)'
        )
    out = []
    for i, rule in enumerate(value):
        ok = isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)
        if not ok or not (rule[1] is None or isinstance(rule[1], Mapping)):
            raise ConfigError(
                f"config key 'rules[{i}]' is {rule!r}; it must be a (regex, settings) pair, "
                "settings a dict of optimizer keys or None to freeze"
            )
        out.append((rule[0], None if rule[1] is None else _plain(rule[1])))
    return tuple(out)


def resolve(config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` laid over :func:`default_config`: every key present, none unknown.

    Raises:
      ConfigError: a key that does not exist, or a value of the wrong kind.
    """
    given = _plain(config)
    given.pop("stages", None)
    out = default_config()
    _check_keys(given, out.to_dict(), "")
    for key in OPEN_GROUPS:
        if key in given:
            out[key] = ml_collections.ConfigDict(given.pop(key))
    if "rules" in given:
        out.rules = _rules(given.pop("rules"))
    try:
        out.update(given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config value: {e}") from None
    if not out.model.get("name"):
        raise ConfigError("config key 'model.name' is required")
    if not out.optimizer.get("name"):
        raise ConfigError("config key 'optimizer.name' is required")
    for key, allowed in (
        ("compute_dtype", ("float32", "bfloat16")),
        ("checkpoint.best_mode", ("max", "min")),
        ("schedule.name", ("constant", "cosine", "warmup_cosine", "linear")),
    ):
        group, _, leaf = key.rpartition(".")
        value = (out[group] if group else out)[leaf]
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {allowed}")
    try:  # the one check of the parallel mode, jft.train.parallel's
        parallel.check(out.parallel, out.fsdp)
    except ValueError as e:
        raise ConfigError(f"bad config: {e}") from None
    if out.init.required and not out.init.path:
        raise ConfigError(
            "this recipe needs pretrained weights: set config.init.path "
            "(or pass the file as the config argument, configs/X.py:/path/to/weights)"
        )
    if out.num_steps < 1:
        raise ConfigError(f"config key 'num_steps' must be >= 1, got {out.num_steps}")
    validate(out)
    return out


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
