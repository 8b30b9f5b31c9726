"""Checksums of a state's arrays: the same value on any sharding, topology or device count.

A checkpoint stores one uint32 per array (and a CRC of the data iterator's
state); a restored step whose arrays do not give the same values is damaged.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.checkpoint.layout import CheckpointError

__all__ = [
    "DATA_STATE_KEY",
    "PARAM_GROUPS",
    "checksums",
    "flat_with_paths",
    "json_checksum",
    "jsonable",
    "refuse_nonfinite",
    "summary",
    "verify",
]

# The groups of a state that hold parameters and statistics: a NaN or Inf there is
# poison. (An optimizer state may hold Inf on purpose: reduce_on_plateau's best value.)
PARAM_GROUPS = ("trainable", "frozen", "batch_stats", "params")
DATA_STATE_KEY = "#data_state"


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(key_path: Sequence[Any]) -> str:
    return "/".join(_key_name(k) for k in key_path)


def flat_with_paths(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by their ``/``-joined paths (``trainable/head/kernel``)."""
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_uint32(x: jax.Array) -> jax.Array:
    # The bits of x, widened to uint32 (64-bit types become a trailing pair of words).
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    # sum_i bits_i * w_i mod 2**32, with odd position weights w_i: any single flipped bit,
    # and most larger damage, changes it; modular sums do not depend on the reduction
    # order, so the same value comes out on any sharding or device count.
    u = _as_uint32(x)
    index = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) * jnp.uint32(
            stride % 2**32
        )
        stride *= u.shape[dim]
    weights = (index * jnp.uint32(2654435761)) | jnp.uint32(1)
    return jnp.sum(u * weights, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_checksum, tree))
_summary_jit = jax.jit(lambda tree: (jax.tree.map(_checksum, tree), jax.tree.map(_finite, tree)))


def checksums(state: Any) -> dict[str, int]:
    """A uint32 checksum of each array of ``state``, by path; equal on any topology."""
    sums = jax.device_get(_checksums_jit(state))
    return {path: int(v) for path, v in flat_with_paths(sums).items()}


def summary(state: Any) -> tuple[dict[str, int], list[str]]:
    """The checksums of ``state`` and the paths of its parameters that hold NaN or Inf."""
    sums, finite = jax.device_get(_summary_jit(state))
    bad = [
        path
        for path, ok in flat_with_paths(finite).items()
        if not bool(ok) and path.split("/", 1)[0] in PARAM_GROUPS
    ]
    return {path: int(v) for path, v in flat_with_paths(sums).items()}, bad


def json_checksum(obj: Any) -> int:
    """A CRC-32 of ``obj``'s JSON (keys sorted)."""
    return zlib.crc32(json.dumps(obj, sort_keys=True).encode())


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (a ConfigDict, tuples and NumPy scalars included)."""
    if hasattr(obj, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
        obj = obj.to_dict()

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray | jax.Array):
            return np.asarray(o).tolist()
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if isinstance(o, set | frozenset):
            return sorted(o)
        return repr(o)

    return json.loads(json.dumps(obj, default=default))


def verify(state: Any, expected: Mapping[str, int] | None, data_state: Any = None) -> None:
    """Raises a ValueError (the reason) unless ``state`` and ``data_state`` match ``expected``."""
    if expected is None:
        raise ValueError("its checksums are missing")
    expected = dict(expected)
    data_sum = expected.pop(DATA_STATE_KEY, None)
    if data_state is not None and data_sum is not None:
        if json_checksum(jsonable(data_state)) != data_sum:
            raise ValueError("its data_state differs from the one saved (checksum mismatch)")
    got = checksums(state)
    bad = [p for p in expected if got.get(p) != expected[p]]
    if bad or set(got) != set(expected):
        raise ValueError(f"checksum mismatch in {', '.join(bad[:3]) or 'the array list'}")


def refuse_nonfinite(directory: str, step: int, state: Any, steps: Sequence[int]) -> None:
    """Raises a CheckpointError when a restored step's parameters hold NaN or Inf."""
    _, bad = summary(state)
    if not bad:
        return
    older = [s for s in steps if s < step]
    earlier = (
        f"move {os.path.join(directory, str(step))} aside to resume from step {older[-1]}, "
        if older
        else ""
    )
    raise CheckpointError(
        f"checkpoint {directory} step {step} holds NaN or Inf in {bad[0]}: it cannot be "
        f"resumed; {earlier}or start from scratch in a new workdir"
    )
