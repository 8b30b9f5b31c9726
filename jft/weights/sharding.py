"""Weights read tensor by tensor straight into their shardings on a device mesh.

Rules name the layout: ``(regex, spec)`` pairs over variable paths
(``params/backbone/layers_0/attention/q_proj/kernel``, matched with or without
the collection), first match wins, every variable must match. A spec is a
:class:`jax.sharding.PartitionSpec` (or a tuple of mesh axis names and ``None``),
``None`` for replicated, or :data:`FSDP`: the largest dimension that the
``"data"`` axis divides, for leaves of at least :data:`FSDP_MIN_SIZE` elements
(the layout :func:`jft.train.parallel.state_shardings` gives with ``fsdp=True``,
so a loaded model enters the train step without being moved).

:func:`place` builds each array from the shards its devices own: every distinct
shard is copied out of the memory-mapped file in chunks of a quarter of it into
a buffer of its own mapping, cast, checked finite, put on its devices, and the
file's pages are released behind it. The host memory a load needs beyond the
placed arrays is under one shard of the largest tensor, not the model
(``benchmarks/decoder.py --load`` measures it: 0.6x on 8 CPU devices).
"""

from __future__ import annotations

import math
import mmap
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpy.lib.array_utils import byte_bounds

from jft.weights.restore import WeightsError, check_finite

__all__ = [
    "FSDP",
    "FSDP_MIN_SIZE",
    "LLAMA_TENSOR_PARALLEL",
    "fsdp_spec",
    "place",
    "rule_shardings",
]

FSDP = "fsdp"
"""A rule's spec: shard the largest dimension the ``"data"`` axis divides (small leaves whole)."""

FSDP_MIN_SIZE = 2**14
"""Leaves with fewer elements stay replicated under :data:`FSDP`: sharding them saves little."""

_M = "model"
LLAMA_TENSOR_PARALLEL: tuple[tuple[str, Any], ...] = (
    (r".*/attention/[qkv]_proj/kernel", PartitionSpec(None, _M)),
    (r".*/attention/[qkv]_proj/bias", PartitionSpec(_M)),
    (r".*/attention/o_proj/kernel", PartitionSpec(_M, None)),
    (r".*/mlp/(gate|up)_proj/kernel", PartitionSpec(None, _M)),
    (r".*/mlp/down_proj/kernel", PartitionSpec(_M, None)),
    (r".*/embed_tokens/embedding", PartitionSpec(None, _M)),
    (r"(params/)?lm_head/kernel", PartitionSpec(None, _M)),
    (r".*", None),
)
"""Megatron-style tensor parallelism of the Llama family over a ``"model"`` mesh axis.

Query, key, value, gate and up projections are split by output (heads, MLP
units), the output and down projections by input, so each block needs one
all-reduce after attention and one after the MLP; the embedding and ``lm_head``
are split along the hidden and vocabulary dimensions; norms stay replicated.
The key/value heads must divide among the ``"model"`` devices.
"""

# A shard is copied in chunks of a quarter of it (the file pages a chunk touches are
# released before the next), but of this many bytes at least, so that a small shard
# of a wide tensor is not read a row at a time. The host then holds the shard, its
# copy on the device (a CPU device may use the shard itself) and a quarter shard of
# file pages.
_MIN_CHUNK = 1 << 20
# The kernel's fault-around: a page fault maps up to this many bytes of cached pages
# around it, beyond the chunk being read.
_FAULT_AROUND = 1 << 16


def fsdp_spec(shape: Sequence[int], n: int, axis: str = "data") -> PartitionSpec:
    """The :data:`FSDP` spec of a leaf of ``shape`` over an axis of ``n`` devices."""
    if math.prod(shape) < FSDP_MIN_SIZE:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            return PartitionSpec(*([None] * dim), axis)
    return PartitionSpec()


def _spec(path: str, shape: tuple[int, ...], value: Any, mesh: Mesh) -> PartitionSpec:
    if value == FSDP:
        if "data" not in mesh.shape:
            raise WeightsError(
                f"sharding rule 'fsdp' for {path} needs a mesh axis named 'data'; "
                f"the mesh has {tuple(mesh.shape)}"
            )
        return fsdp_spec(shape, mesh.shape["data"])
    spec = PartitionSpec() if value is None else PartitionSpec(*value)
    if len(spec) > len(shape):
        raise WeightsError(
            f"sharding rule {spec} for {path} has more entries than its shape {shape}"
        )
    for dim, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise WeightsError(
                f"sharding rule {spec} for {path} names mesh axes {unknown}; "
                f"the mesh has {tuple(mesh.shape)}"
            )
        n = math.prod(mesh.shape[a] for a in names)
        if shape[dim] % n:
            raise WeightsError(
                f"sharding rule {spec} for {path}: dimension {dim} of shape {shape} does not "
                f"divide among {n} devices; change the rule or the mesh"
            )
    return spec


def rule_shardings(
    tree: Mapping[str, Any], mesh: Mesh, rules: Sequence[tuple[str, Any]]
) -> dict[str, NamedSharding]:
    """The :class:`NamedSharding` of each leaf of a flat ``tree`` (path -> array or shape struct).

    Args:
      tree: ``'/'``-joined variable paths (collection first) to anything with a ``shape``.
      mesh: the device mesh.
      rules: ``(regex, spec)`` pairs; first match wins; a regex matches the path with or
        without its collection (``lm_head/kernel`` and ``params/lm_head/kernel``).

    Raises:
      WeightsError: one line: a bad regex, a path no rule matches, a spec naming an axis
        the mesh lacks or a dimension the axis does not divide.
    """
    compiled = []
    for pattern, value in rules:
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise WeightsError(f"invalid sharding rule regex {pattern!r}: {e}") from None
    out = {}
    for path, leaf in tree.items():
        bare = path.split("/", 1)[-1]
        hit = next((v for p, v in compiled if p.fullmatch(path) or p.fullmatch(bare)), _NONE)
        if hit is _NONE:
            raise WeightsError(
                f"no sharding rule matches {path}; add one (('.*', None) replicates the rest)"
            )
        out[path] = NamedSharding(mesh, _spec(path, tuple(leaf.shape), hit, mesh))
    return out


_NONE = object()


def place(
    value: np.ndarray,
    sharding: NamedSharding | None,
    dtype: Any,
    *,
    path: str,
    source: str | None = None,
    flat: Mapping[str, Any] | None = None,
) -> jax.Array:
    """``value`` (a memory-mapped view, maybe transposed) as a ``dtype`` array on ``sharding``.

    ``sharding`` None: the whole array on the default device, uncommitted (as
    ``jnp.asarray`` puts it), read the same way, so that a load without a mesh also
    holds about one tensor at a time beyond the placed arrays.

    Each distinct shard is read once, in chunks along its outermost dimension in
    memory, and the file pages each chunk touched are released from this process
    (``MADV_DONTNEED``; they stay in the page cache), and at the end those of the
    whole tensor; the copy is its own anonymous mapping, unmapped when dropped (on
    a CPU the device buffers may be it), so the host holds about one shard at a time
    beyond the placed arrays. A shard holding NaN or Inf raises a WeightsError
    naming ``path`` (and the file's tensor, when ``flat``, the file's arrays by name,
    is given).
    """
    if not isinstance(value, np.ndarray):
        value = np.asarray(value)
    shape = tuple(value.shape)
    whole = tuple((0, n) for n in shape)
    by_index: dict[tuple, list[jax.Device]] = {whole: []}
    if sharding is not None:
        by_index = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            by_index.setdefault(_key(index, shape), []).append(device)
    mapping = _mapping(value)
    arrays = []
    for key, devices in by_index.items():
        host = _copy(value[tuple(slice(*k) for k in key)], np.dtype(dtype), mapping)
        if not _maybe_finite(host):
            check_finite({path: host}, flat or {}, source)
        arrays += [jax.device_put(host, d) for d in devices] if sharding else [jax.device_put(host)]
        del host
    if mapping is not None and value.size:
        # Fault-around mapped pages beyond the chunks released: release the whole
        # tensor and its margins.
        _release(value, *mapping, margin=_FAULT_AROUND)
    if sharding is None:
        return arrays[0]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _maybe_finite(x: np.ndarray) -> bool:
    """False if ``x`` may hold NaN or Inf (then :func:`check_finite` decides), without
    ``np.isfinite``'s shard of booleans: a float64 sum is finite for finite float32
    or narrower values and NaN or Inf if any is; float64 values may overflow it."""
    if not jax.dtypes.issubdtype(x.dtype, np.inexact):
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(x, dtype=np.complex128 if x.dtype.kind == "c" else np.float64)
    return bool(np.isfinite(total))


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _mapping(value: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The mmap under a memory-mapped ``value`` and the address it starts at, else None."""
    x, root = value, None
    while isinstance(x, np.ndarray):
        root, x = x, x.base
    if not isinstance(x, mmap.mmap) or root is None:
        return None
    return x, byte_bounds(root)[0]


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty array on its own anonymous mapping, unmapped as soon as it is dropped.

    ``np.empty`` of a shard-sized array comes from malloc, which, having raised its
    mmap threshold after the first free, keeps the freed shard in its heap: the
    process would grow by a shard or two per tensor size. (A mapping of zero bytes
    cannot be made; empty arrays come from ``np.empty``.)
    """
    size = math.prod(shape)
    if size == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size * dtype.itemsize), dtype, size).reshape(shape)


def _copy(sub: np.ndarray, dtype: np.dtype, mapping: tuple[mmap.mmap, int] | None) -> np.ndarray:
    out = _host_buffer(sub.shape, dtype)
    if sub.ndim == 0 or sub.size == 0:
        out[...] = sub
        return out
    axis = max(range(sub.ndim), key=lambda d: abs(sub.strides[d]))
    stride = max(abs(sub.strides[axis]), 1)
    step = max(1, max(sub.size * sub.itemsize // 4, _MIN_CHUNK) // stride)
    step = min(step, sub.shape[axis])
    lead = (slice(None),) * axis
    for start in range(0, sub.shape[axis], step):
        part = lead + (slice(start, start + step),)
        out[part] = sub[part]
        if mapping is not None:
            _release(sub[part], *mapping)
    return out


def _release(chunk: np.ndarray, mm: mmap.mmap, base: int, *, margin: int = 0) -> None:
    lo, hi = byte_bounds(chunk)
    start = max(0, lo - base - margin) // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), hi - base + margin) - start)
