"""Placing the train state and the batches on devices for each parallel mode of the train step.

The modes of :func:`jft.train.make_train_step`:

- ``"none"``: one device; the state and batches are ordinary arrays.
- ``"jit"``: a :class:`jax.sharding.Mesh` with one ``"data"`` axis over every
  device of every process. Batches are sharded over it; the state is
  replicated, or with FSDP its large leaves are sharded over the same axis.
- ``"pmap"``: the local devices; the state carries a leading device axis (one
  replica per device) and each batch is reshaped to ``(devices, rows, ...)``.

Each process feeds its own slice of the global batch (``global_batch //
jax.process_count()`` rows, as :func:`jft.data.get` yields it); with
:func:`shard_batch` the step sees the global batch. :func:`host_state` gives
back the single-copy state, for saving and evaluation code that expects it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS",
    "FSDP_MIN_SIZE",
    "constrain_batch",
    "host_state",
    "make_mesh",
    "place_state",
    "shard_batch",
    "state_shardings",
]

AXIS = "data"
"""The data-parallel axis: the mesh axis of ``"jit"`` and the axis name of ``"pmap"``."""

FSDP_MIN_SIZE = 2**14
"""Leaves with fewer elements stay replicated under FSDP: sharding them saves little memory."""

_MODES = ("none", "jit", "pmap")


def _check_mode(parallel: str) -> None:
    if parallel not in _MODES:
        raise ValueError(f"parallel must be one of {_MODES}, got {parallel!r}")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with the ``"data"`` axis over ``devices`` (default: all, of all processes).

    The axis type is ``Auto`` (sharding is propagated by the compiler), which the
    train step relies on.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    # Shard the largest dimension that the axis divides; small leaves stay whole.
    if math.prod(shape) < FSDP_MIN_SIZE:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            return PartitionSpec(*([None] * dim), AXIS)
    return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """The :class:`NamedSharding` of each leaf of ``state`` under ``"jit"``.

    Replicated, or with ``fsdp`` the largest dimension that the mesh divides of
    each leaf with at least :data:`FSDP_MIN_SIZE` elements is sharded over the
    ``"data"`` axis (parameters and optimizer state alike: an Adam moment has
    its parameter's shape, so it is sharded the same way). Shapes are all that
    is read, so it works on arrays, tracers and ``jax.ShapeDtypeStruct``.
    """
    n = mesh.shape[AXIS]

    def sharding(x):
        spec = _fsdp_spec(tuple(x.shape), n) if fsdp else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, state)


def _pmap_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def _to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Every process holds the same value; each places the pieces its devices own.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(state: Any, parallel: str, mesh: Mesh | None = None, *, fsdp: bool = False) -> Any:
    """Puts a single-copy ``state`` (e.g. a :class:`jft.train.TrainState`) where the step wants it.

    ``"none"``: on the default device. ``"jit"``: replicated over ``mesh``
    (default :func:`make_mesh`), or sharded as :func:`state_shardings` says with
    ``fsdp``; in a multi-process run every process must pass the same values.
    ``"pmap"``: one copy per local device, stacked on a new leading axis.
    """
    _check_mode(parallel)
    if fsdp and parallel != "jit":
        raise ValueError(f"fsdp=True needs parallel='jit', got parallel={parallel!r}")
    if parallel == "none":
        return jax.device_put(state)
    if parallel == "jit":
        mesh = make_mesh() if mesh is None else mesh
        return jax.tree.map(_to_global, state, state_shardings(state, mesh, fsdp=fsdp))
    pmesh = _pmap_mesh()
    n = pmesh.size
    sharding = NamedSharding(pmesh, PartitionSpec(AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(jnp.asarray(x), (n, *np.shape(x))), sharding),
        state,
    )


def host_state(state: Any, parallel: str) -> Any:
    """The canonical single-copy state: ``"pmap"``'s device axis removed, else ``state`` itself.

    Under ``"jit"`` the arrays stay global (replicated or FSDP-sharded), which
    orbax saves as they are; under ``"pmap"`` each leaf is the first local
    replica (all replicas are equal).
    """
    _check_mode(parallel)
    if parallel != "pmap":
        return state
    return jax.tree.map(lambda x: x.addressable_data(0)[0], state)


def constrain_batch(batch: Any, mesh: Mesh, *, batch_axis: int = 0) -> Any:
    """Inside a jitted function: shard the ``batch_axis`` of each leaf over ``"data"``."""

    def constrain(x):
        spec = PartitionSpec(*([None] * batch_axis), AXIS)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, batch)


def shard_batch(local_batch: Mapping[str, Any], parallel: str, mesh: Mesh | None = None) -> Any:
    """This process's slice of the global batch -> the batch the step takes.

    Args:
      local_batch: a dict of numpy arrays whose first axis holds this process's
        rows (``global_batch // jax.process_count()``).
      parallel: ``"none"``: the arrays put on the default device. ``"jit"``:
        global arrays sharded over ``mesh``'s ``"data"`` axis, built with
        ``jax.make_array_from_process_local_data`` (the rows of process ``p``
        are rows ``p * b:(p + 1) * b`` of the global batch). ``"pmap"``: each
        leaf reshaped to ``(local_devices, rows // local_devices, ...)``, one
        slice per local device.
      mesh: the mesh of ``"jit"`` (default :func:`make_mesh`).

    Raises:
      ValueError: the rows do not divide evenly among the devices.
    """
    _check_mode(parallel)
    if parallel == "none":
        return jax.device_put(dict(local_batch))
    if parallel == "jit":
        mesh = make_mesh() if mesh is None else mesh
        sharding = NamedSharding(mesh, PartitionSpec(AXIS))
        local = len(mesh.local_devices)

        def put(x):
            x = np.asarray(x)
            if x.shape[0] % local:
                raise ValueError(
                    f"a batch of {x.shape[0]} rows in this process does not divide among "
                    f"its {local} devices"
                )
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(put, dict(local_batch))
    pmesh = _pmap_mesh()
    n = pmesh.size
    sharding = NamedSharding(pmesh, PartitionSpec(AXIS))

    def put_pmap(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"a batch of {x.shape[0]} rows in this process does not divide among its "
                f"{n} devices"
            )
        return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), sharding)

    return jax.tree.map(put_pmap, dict(local_batch))
