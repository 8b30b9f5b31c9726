"""Nested parameter dicts seen as ``/``-joined paths: the one flatten and filter jft uses.

flax.traverse_util.flatten_dict does the same, but importing any of flax loads
flax.linen, and ``import jft.partition`` stays as light as ``import optax``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["filter_leaves", "flatten"]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for a nested mapping; anything not a mapping is a leaf.

    Empty subtrees have no leaves, so they vanish (as in flax).

    >>> flatten({"a": {"b": 1, "c": {}}, "d": 2})
    {'a/b': 1, 'd': 2}
    """
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def filter_leaves(
    tree: Mapping[str, Any], keep: Callable[[str], bool], prefix: str = ""
) -> dict[str, Any]:
    """The nested dict of the leaves whose path ``keep`` accepts, empty subtrees pruned.

    >>> filter_leaves({"a": {"b": 1, "c": 2}, "d": 3}, lambda p: p != "a/b")
    {'a': {'c': 2}, 'd': 3}
    """
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub = filter_leaves(value, keep, path + "/")
            if sub:
                out[key] = sub
        elif keep(path):
            out[key] = value
    return out
