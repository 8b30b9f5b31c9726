"""What a resolved run config describes, built: the model, the optimizer, its schedule and rules.

Each builder turns a library error (an unknown rule, a bad argument) into a
:class:`~jft.train.defaults.ConfigError` that names the config key.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections
import optax

from jft import layerwise, models, optim, partition, peft
from jft._registry import Registry
from jft.train.defaults import ConfigError
from jft.weights.pretrained import model_from_folder

__all__ = [
    "OPTIMIZERS",
    "build_model",
    "build_optimizer",
    "build_rules",
    "init_skip",
    "learning_rate",
    "lora_config",
    "optimizer_arguments",
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


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry(
    "optimizer",
    {
        n: getattr(optim, n)
        for n in optim.__all__
        if n[0].islower() and not n.startswith("scale_by") and n != "reduce_on_plateau"
    },
)
"""The update rules ``optimizer.name`` may name: jft.optim's standalone optimizers."""


def _rules() -> list[str]:
    """The names :data:`OPTIMIZERS` knows."""
    return OPTIMIZERS.names()


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


def _settings(config: ml_collections.ConfigDict, group: Any) -> dict[str, tuple[Any, str]]:
    """A group's optimizer settings as ``{argument: (value, config key)}``.

    ``group`` is ``(config key, settings dict)`` of a rule (``None`` for
    ``config.optimizer`` itself); it inherits ``config.optimizer``'s keys unless it
    names another optimizer.
    """
    base = {k: (v, f"optimizer.{k}") for k, v in config.optimizer.items()}
    if group is None:
        return base
    prefix, settings = group
    own = {k: (v, f"{prefix}.{k}") for k, v in dict(settings).items()}
    if "name" in own and own["name"][0] != config.optimizer.name:
        return own
    return {**base, **own}


def _optimizer(
    config: ml_collections.ConfigDict, group: Any = None
) -> optax.GradientTransformation:
    """``jft.optim.<name>(**arguments)`` of one group, its learning rate on the schedule."""
    settings = _settings(config, group)
    where = {k: key for k, (_, key) in settings.items()}
    kwargs = {k: v for k, (v, _) in settings.items()}
    name = kwargs.pop("name", None)
    factory = OPTIMIZERS.get(name, key=where.get("name", "optimizer.name"), error=ConfigError)
    params = inspect.signature(factory).parameters
    lr_name = next(iter(params))
    if "lr" in kwargs and lr_name != "lr":
        kwargs[lr_name] = kwargs.pop("lr")
        where[lr_name] = where.pop("lr")
    for key in kwargs:
        if key not in params:
            group_key = where[key].rpartition(".")[0]
            raise ConfigError(
                f"unknown config key '{where[key]}' for {name}; {group_key} may set "
                f"name, lr, {', '.join(p for p in params if p != lr_name)}"
            )
    if lr_name in kwargs:
        lr = kwargs[lr_name]
        # Checked here, not only by the rule: a schedule hides a bad peak from it.
        if not (_finite_number(lr) and lr >= 0):
            raise ConfigError(
                f"config key '{where[lr_name]}' is {lr!r}; it must be a finite number >= 0 "
                "(e.g. 1e-3)"
            )
        kwargs[lr_name] = _schedule(config, float(lr))
    try:
        tx = factory(**kwargs)
    except (TypeError, ValueError) as e:
        # The rule's own check names its argument ("momentum must be in [0, 1), got ...").
        msg = " ".join(str(e).split())
        key = next((k for k in where if msg.startswith(k) or f"{k}=" in msg), None)
        place = f"config key '{where[key]}'" if key else f"the {name} settings"
        raise ConfigError(f"{place}: {msg}") from None
    if config.clip_grad_norm:
        # Global: the partitioned optimizer gives it the norm of every trainable gradient.
        tx = optax.chain(partition.clip_by_global_norm(config.clip_grad_norm), tx)
    return tx


def optimizer_arguments(name: str) -> dict[str, Any]:
    """The arguments of ``jft.optim.<name>`` with their defaults; the learning rate is ``lr``.

    An argument without a default maps to ``inspect.Parameter.empty``.

    Raises:
      ConfigError: ``name`` is not an optimizer.
    """
    params = list(inspect.signature(OPTIMIZERS.get(name, error=ConfigError)).parameters.values())
    return {"lr" if i == 0 else p.name: p.default for i, p in enumerate(params)}


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainable parameters' optimizer: ``jft.optim.<name>`` with the schedule and clipping.

    This is ``config.optimizer``; a rule of ``config.rules`` builds its own from
    its settings over these.

    Raises:
      ConfigError: an unknown optimizer or argument.
    """
    return _optimizer(config)


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """The learning rate (a float or a schedule) that :func:`build_optimizer` uses."""
    lr = config.optimizer.get("lr", config.optimizer.get("learning_rate"))
    return None if lr is None else _schedule(config, float(lr))


def _layerwise(config: ml_collections.ConfigDict, frozen: list[str]) -> list[tuple[str, Any]]:
    """The rules of ``config.layerwise_lr``: the blocks top down, the embeddings, the rest."""
    lw = config.layerwise_lr
    lr_key = "learning_rate" if "learning_rate" in config.optimizer else "lr"
    base_lr = config.optimizer.get(lr_key)
    if base_lr is None:
        raise ConfigError(
            f"config key 'layerwise_lr.decay' is {lw.decay}, but {config.optimizer.name} has no "
            "learning rate in config.optimizer to decay; set optimizer.lr"
        )

    def make(lr: float) -> optax.GradientTransformation:
        return _optimizer(config, ("layerwise_lr", {lr_key: lr}))

    try:
        rules = layerwise.layerwise_lr_rules(
            lw.num_layers,
            float(base_lr),
            lw.decay,
            make,
            frozen=frozen,
            layer_prefix=lw.layer_prefix,
            embeddings=lw.embeddings or None,
        )
    except partition.PartitionError as e:
        raise ConfigError(f"config key 'layerwise_lr': {e}") from None
    return rules[len(frozen) :]


def build_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """The :mod:`jft.partition` rules of a config, first match wins.

    In order: ``(regex, None)`` for each of ``config.frozen``; ``config.rules``,
    each ``(regex, settings)`` with its own optimizer (``settings`` over
    ``config.optimizer``) or ``(regex, None)``, frozen; with
    ``config.layerwise_lr.decay < 1``, the transformer blocks from the top down at
    decaying rates and the embeddings; and ``(".*", config.optimizer)`` for the
    rest, unless ``config.rules`` ends with ``".*"`` itself.

    With LoRA (``config.lora.targets``), everything but the frozen parameters is
    the adapters and ``lora.modules_to_save``, and the rest of the model is frozen.

    Raises:
      ConfigError: an unknown optimizer or argument, naming its config key.
    """
    frozen = [(r, None) for r in config.frozen]
    if lora_config(config) is not None:
        also = [f"{re.escape(m)}/.*" for m in config.lora.modules_to_save]
        return frozen + peft.adapter_rules(build_optimizer(config), also=also)
    explicit = [
        (regex, None if settings is None else _optimizer(config, (f"rules[{i}][1]", settings)))
        for i, (regex, settings) in enumerate(config.rules)
    ]
    if config.layerwise_lr.decay != 1:
        off = [r for r, tx in frozen + explicit if tx is None]
        return frozen + explicit + _layerwise(config, off)
    if explicit and explicit[-1][0] == ".*":
        return frozen + explicit
    return frozen + explicit + [(".*", build_optimizer(config))]


def lora_config(config: ml_collections.ConfigDict) -> peft.LoraConfig | None:
    """The :class:`jft.peft.LoraConfig` of ``config.lora``, or None when LoRA is off."""
    c = config.lora
    if not c.targets:
        return None
    return peft.LoraConfig(
        targets=tuple(c.targets),
        rank=c.rank,
        alpha=c.alpha,
        dropout=c.dropout,
        variant=c.variant,
        quantize=c.get("quantize", ""),
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
