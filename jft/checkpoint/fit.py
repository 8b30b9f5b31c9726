"""Whether a saved state fits a model: the arrays orbax recorded against a target's.

The arrays are compared from orbax's metadata, before any is read, so a
checkpoint of another model is refused in one line naming what differs, and
nothing is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jft.checkpoint.checksums import flat_with_paths

__all__ = ["MAX_LISTED", "abstract", "arrays_of", "as_stored", "mismatch", "pmap_hint", "problems"]

MAX_LISTED = 4


def arrays_of(tree_metadata: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``path -> (shape, dtype name)`` of the arrays in orbax's metadata of a PyTree."""
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return {
        path: (tuple(int(d) for d in m.shape), np.dtype(m.dtype).name)
        for path, m in flat_with_paths(tree).items()
    }


def abstract(target_state: Any) -> Any:
    """ShapeDtypeStructs with shardings: those of the target, else the first device."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(
            np.shape(x), np.result_type(x.dtype), sharding=sharding or default
        )

    return jax.tree.map(one, target_state)


def as_stored(tree_metadata: Any) -> Any:
    """ShapeDtypeStructs on the first device, shaped as orbax recorded them (no model needed)."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)


def problems(
    stored: Mapping[str, tuple[tuple[int, ...], str]], target: Mapping[str, Any]
) -> list[str]:
    """What differs between the stored arrays and the target's, most telling first."""
    found = []  # (path, ndim, text)
    for path, (shape, dtype) in stored.items():
        if path not in target:
            found.append((path, len(shape), f"{path} is in the checkpoint but not in the model"))
            continue
        t = target[path]
        if tuple(t.shape) != tuple(shape):
            text = f"{path} is {tuple(shape)} in the checkpoint and {tuple(t.shape)} in the model"
            found.append((path, len(shape), text))
        elif np.dtype(t.dtype).name != dtype:
            text = f"{path} is {dtype} in the checkpoint and {np.dtype(t.dtype).name} in the model"
            found.append((path, len(shape), text))
    for path, t in target.items():
        if path not in stored:
            found.append((path, len(t.shape), f"{path} is in the model but not in the checkpoint"))

    # Parameters first, kernels before vectors: they say what differs; the BatchNorm
    # statistics and optimizer slots of the same layers only repeat it.
    def rank(item: tuple[str, int, str]) -> tuple[int, int, str]:
        path, ndim, _ = item
        group = path.split("/", 1)[0]
        order = {"trainable": 0, "frozen": 0, "params": 0, "batch_stats": 1, "opt_state": 3}
        return order.get(group, 2), -ndim, path

    return [text for *_, text in sorted(found, key=rank)]


def pmap_hint(stored: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    """A hint when each target array is the stored one with pmap's leading device axis."""
    leading = set()
    for path, t in target.items():
        shape = tuple(t.shape)
        if path not in stored or shape[1:] != tuple(stored[path][0]) or not shape:
            return ""
        leading.add(shape[0])
    if len(leading) != 1:
        return ""
    return " (a pmap state? restore the canonical state, then replicate it)"


def mismatch(
    directory: str, step: int, stored: Mapping[str, Any], target: Mapping[str, Any]
) -> str | None:
    """One line saying how step ``step`` does not fit the target, or None when it fits."""
    found = problems(stored, target)
    if not found:
        return None
    more = len(found) - MAX_LISTED
    return (
        f"checkpoint {directory} step {step} does not fit this model: "
        + "; ".join(found[:MAX_LISTED])
        + (f"; and {more} more" if more > 0 else "")
        + pmap_hint(stored, target)
    )
