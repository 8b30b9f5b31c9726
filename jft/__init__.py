"""jft: fine-tune pretrained models in JAX.

The subpackages load on first use (``jft.train``, ``from jft import data``), so
``import jft.optim`` costs what ``import optax`` costs and does not pull in
tensorflow-datasets, grain, orbax or PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jft import errors

if TYPE_CHECKING:  # what the lazy __getattr__ below returns, for type checkers and IDEs
    from jft import (  # noqa: F401  (listed in __all__ through _SUBPACKAGES)
        checkpoint,
        data,
        models,
        ops,
        optim,
        partition,
        peft,
        train,
        weights,
    )

__version__ = "0.1.0"

_SUBPACKAGES = (
    "checkpoint",
    "data",
    "models",
    "ops",
    "optim",
    "partition",
    "peft",
    "train",
    "weights",
)

__all__ = ["__version__", "errors", *_SUBPACKAGES]


def __getattr__(name: str):
    # Runs only for a name not yet set: importing jft.X sets it on the package.
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jft.{name}")
    raise AttributeError(f"module 'jft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})
