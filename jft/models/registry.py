"""A name -> model-constructor registry, so recipes can name a model as a string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a constructor under ``name`` (a decorator)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        old = _MODELS.get(name)
        # The same function imported twice (pytest's importlib mode) re-registers.
        if old is not None and (old.__module__, old.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(f"model {name!r} is already registered by {old.__module__}")
        _MODELS[name] = fn
        return fn

    return wrap


def get(name: str, **kwargs: Any) -> nn.Module:
    """Returns the model registered as ``name``, built with ``kwargs``.

    Raises:
      ValueError: ``name`` is not a registered model; the message lists them.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)
