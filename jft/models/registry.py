"""A name -> model-constructor registry, so recipes can name a model as a string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jft._registry import Registry

__all__ = ["MODELS", "get", "names", "register"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a constructor under ``name`` (a decorator)."""
    return MODELS.register(name)


def get(name: str, **kwargs: Any) -> nn.Module:
    """Returns the model registered as ``name``, built with ``kwargs``.

    Raises:
      UnknownNameError: ``name`` is not a registered model; the message lists them.
    """
    return MODELS.get(name)(**kwargs)


def names() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()
