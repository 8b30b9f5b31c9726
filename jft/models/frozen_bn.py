"""Which BatchNorm layers are frozen when some of a model's parameters are.

A model with BatchNorm takes ``frozen_bn``: regexes over the module paths of the
layers that always use their running statistics (Keras's convention for a frozen
layer). :func:`frozen_bn_patterns` derives them from which parameters are frozen,
so a frozen trunk's BatchNorm layers stop updating their statistics too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from flax import traverse_util

__all__ = ["frozen_bn_patterns"]


def _paths(tree: Mapping[str, Any]) -> list[str]:
    return list(traverse_util.flatten_dict(tree, sep="/"))


def frozen_bn_patterns(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], is_frozen: Callable[[str], bool]
) -> tuple[str, ...]:
    """The module paths of the BatchNorm layers whose parameters are frozen, as exact regexes.

    A BatchNorm layer (a module holding ``batch_stats``) is frozen when all its
    parameters (scale and bias) are; one without parameters is frozen when its
    ``scale`` would be. The result is what a model's ``frozen_bn`` attribute takes.

    Args:
      params: the model's parameters (a nested dict; arrays or shapes).
      batch_stats: its BatchNorm statistics.
      is_frozen: whether the parameter at a ``/``-joined path is frozen, e.g.
        :func:`jft.partition.is_frozen` of the partition rules.

    Returns:
      ``re.escape``-d module paths, sorted.

    >>> params = {"bn": {"scale": 1.0, "bias": 0.0}, "head": {"kernel": 1.0}}
    >>> stats = {"bn": {"mean": 0.0, "var": 1.0}}
    >>> frozen_bn_patterns(params, stats, lambda path: path.startswith("bn/"))
    ('bn',)
    """
    param_paths = _paths(params)
    modules = sorted({p.rsplit("/", 1)[0] for p in _paths(batch_stats)})
    out = []
    for module in modules:
        own = [p for p in param_paths if p.rsplit("/", 1)[0] == module]
        if all(is_frozen(p) for p in own or [f"{module}/scale"]):
            out.append(re.escape(module))
    return tuple(out)
