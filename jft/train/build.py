"""What a resolved run config describes, built: the model, the optimizer, its schedule and rules.

Each builder turns a library error (an unknown rule, a bad argument) into a
:class:`~jft.train.defaults.ConfigError` that names the config key.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import ml_collections
import optax

from jft import models, optim, peft
from jft.train.defaults import ConfigError
from jft.weights.pretrained import model_from_folder

__all__ = [
    "build_model",
    "build_optimizer",
    "build_rules",
    "init_skip",
    "learning_rate",
    "lora_config",
    "optimizer_keys",
]


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

    ``model.name="pretrained"`` builds what ``config.init.path``'s ``config.json``
    describes (:func:`jft.weights.pretrained.model_from_folder`); the other
    ``config.model`` keys override its fields.

    Raises:
      ConfigError: an unknown model or argument.
    """
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    if name != "pretrained" and name not in models.names():
        raise ConfigError(
            f"unknown model '{name}' (model.name); known: 'pretrained' (init.path's "
            f"config.json), {', '.join(sorted(models.names()))}"
        )
    kwargs.setdefault("num_classes", num_classes)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if name == "pretrained":
            model = model_from_folder(config.init.path, **kwargs)
        else:
            model = models.get(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{name}' does not take these config.model keys: {e}") from None
    lora = lora_config(config)
    return model if lora is None else peft.lora(model, lora)
