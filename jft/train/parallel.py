"""Where the train and eval steps run: one :class:`Parallel` object per parallel mode.

The modes of :func:`jft.train.make_train_step` and :func:`jft.train.make_eval_step`:

- ``"none"``: one device; the state and batches are ordinary arrays.
- ``"jit"``: a :class:`jax.sharding.Mesh` with one ``"data"`` axis over every
  device of every process. Batches are sharded over it; the state is
  replicated, or with FSDP its large leaves are sharded over the same axis.
- ``"pmap"``: the local devices; the state carries a leading device axis (one
  replica per device) and each batch is reshaped to ``(devices, rows, ...)``.

A :class:`Parallel` holds the mode, its mesh and ``fsdp``, checked once when it
is made; it places the state (:meth:`Parallel.place_state`), shards each batch
(:meth:`Parallel.shard_batch`), gives back the single-copy state
(:meth:`Parallel.host_state`) and compiles the steps, which take it as their
``parallel`` argument. Each process feeds its own slice of the global batch
(``global_batch // jax.process_count()`` rows, as :func:`jft.data.get` yields
it); once sharded, the step sees the global batch::

    par = Parallel("jit")
    step = make_train_step(model, rules, loss_fn, parallel=par)
    state = par.place_state(state)
    state, metrics = step(state, par.shard_batch(batch))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jft.train._jit import OptionsJit
from jft.weights.sharding import FSDP_MIN_SIZE, fsdp_spec

__all__ = [
    "AXIS",
    "FSDP_MIN_SIZE",
    "MODES",
    "Parallel",
    "check",
    "host_state",
    "make_mesh",
    "place_state",
    "shard_batch",
    "state_shardings",
]

AXIS = "data"
"""The data-parallel axis: the mesh axis of ``"jit"`` and the axis name of ``"pmap"``."""

MODES = ("none", "jit", "pmap")
"""The parallel modes."""


def check(mode: str, fsdp: bool = False) -> None:
    """The one check of a parallel mode and its FSDP flag (:class:`Parallel` and the config).

    Raises:
      ValueError: an unknown ``mode``, or ``fsdp`` without ``"jit"``.
    """
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES}, got {mode!r}")
    if fsdp and mode != "jit":
        raise ValueError(f"fsdp=True needs parallel='jit', got parallel={mode!r}")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with the ``"data"`` axis over ``devices`` (default: all, of all processes).

    The axis type is ``Auto`` (sharding is propagated by the compiler), which the
    train step relies on.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def state_shardings(state: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """The :class:`NamedSharding` of each leaf of ``state`` under ``"jit"``.

    Replicated, or with ``fsdp`` the largest dimension that the mesh divides of
    each leaf with at least :data:`FSDP_MIN_SIZE` elements is sharded over the
    ``"data"`` axis (parameters and optimizer state alike: an Adam moment has
    its parameter's shape, so it is sharded the same way). That rule is
    :func:`jft.weights.sharding.fsdp_spec`, the one ``from_pretrained`` loads
    into. Shapes are all that is read, so it works on arrays, tracers and
    ``jax.ShapeDtypeStruct``.
    """
    n = mesh.shape[AXIS]

    def sharding(x):
        spec = fsdp_spec(tuple(x.shape), n, AXIS) if fsdp else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, state)


def _divisible_rows(x: Any, devices: int) -> np.ndarray:
    """``x`` as a NumPy array, checked to split evenly among this process's ``devices``."""
    x = np.asarray(x)
    if x.shape[0] % devices:
        raise ValueError(
            f"a batch of {x.shape[0]} rows in this process does not divide among its "
            f"{devices} devices"
        )
    return x


def _pmap_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def _to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Every process holds the same value; each places the pieces its devices own.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A parallel mode with its mesh and FSDP flag, checked once; the steps take it as is.

    Attributes:
      mode: ``"none"``, ``"jit"`` or ``"pmap"``.
      mesh: the mesh of ``"jit"`` (default :func:`make_mesh`: every device of
        every process on one ``"data"`` axis); ``None`` in the other modes.
      fsdp: under ``"jit"``, shard the large parameter and optimizer-state
        leaves over the mesh (:func:`state_shardings`) instead of replicating them.

    Raises:
      ValueError: an unknown mode, ``fsdp`` without ``"jit"``, or a mesh for
        another mode than ``"jit"``.
    """

    mode: str = "none"
    mesh: Mesh | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        check(self.mode, self.fsdp)
        if self.mode == "jit" and self.mesh is None:
            object.__setattr__(self, "mesh", make_mesh())
        elif self.mode != "jit" and self.mesh is not None:
            raise ValueError(f"a mesh is used by parallel='jit' only, got parallel={self.mode!r}")

    @classmethod
    def of(cls, parallel: Parallel | str) -> Parallel:
        """``parallel`` itself, or a mode name as ``Parallel(mode)``."""
        return parallel if isinstance(parallel, Parallel) else cls(parallel)

    @property
    def axis_name(self) -> str | None:
        """The collective axis inside the step: ``"data"`` under ``"pmap"``, else ``None``."""
        return AXIS if self.mode == "pmap" else None

    def place_state(self, state: Any) -> Any:
        """Puts a single-copy ``state`` (a :class:`jft.train.TrainState`) where the step wants it.

        ``"none"``: on the default device. ``"jit"``: replicated over the mesh,
        or sharded as :func:`state_shardings` says with ``fsdp``; in a
        multi-process run every process must pass the same values. ``"pmap"``:
        one copy per local device, stacked on a new leading axis.
        """
        if self.mode == "none":
            return jax.device_put(state)
        if self.mode == "jit":
            shardings = state_shardings(state, self.mesh, fsdp=self.fsdp)
            return jax.tree.map(_to_global, state, shardings)
        pmesh = _pmap_mesh()
        n = pmesh.size
        sharding = NamedSharding(pmesh, PartitionSpec(AXIS))
        return jax.tree.map(
            lambda x: jax.device_put(jnp.broadcast_to(jnp.asarray(x), (n, *np.shape(x))), sharding),
            state,
        )

    def host_state(self, state: Any) -> Any:
        """The canonical single-copy state: ``"pmap"``'s device axis removed, else ``state`` itself.

        Under ``"jit"`` the arrays stay global (replicated or FSDP-sharded), which
        orbax saves as they are; under ``"pmap"`` each leaf is the first local
        replica (all replicas are equal).
        """
        if self.mode != "pmap":
            return state
        return jax.tree.map(lambda x: x.addressable_data(0)[0], state)

    def shard_batch(self, local_batch: Mapping[str, Any]) -> Any:
        """This process's slice of the global batch -> the batch the step takes.

        ``local_batch`` is a dict of numpy arrays whose first axis holds this
        process's rows (``global_batch // jax.process_count()``). ``"none"``: the
        arrays put on the default device. ``"jit"``: global arrays sharded over
        the mesh's ``"data"`` axis, built with
        ``jax.make_array_from_process_local_data`` (the rows of process ``p`` are
        rows ``p * b:(p + 1) * b`` of the global batch). ``"pmap"``: each leaf
        reshaped to ``(local_devices, rows // local_devices, ...)``, one slice
        per local device.

        Raises:
          ValueError: the rows do not divide evenly among the devices.
        """
        if self.mode == "none":
            return jax.device_put(dict(local_batch))
        if self.mode == "jit":
            sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
            local = len(self.mesh.local_devices)

            def put(x):
                x = _divisible_rows(x, local)
                return jax.make_array_from_process_local_data(sharding, x)

            return jax.tree.map(put, dict(local_batch))
        pmesh = _pmap_mesh()
        n = pmesh.size
        sharding = NamedSharding(pmesh, PartitionSpec(AXIS))

        def put_pmap(x):
            x = _divisible_rows(x, n)
            return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), sharding)

        return jax.tree.map(put_pmap, dict(local_batch))

    def constrain_batch(self, batch: Any, *, batch_axis: int = 0) -> Any:
        """In the step: under ``"jit"``, shard the ``batch_axis`` of each leaf over ``"data"``."""
        if self.mode != "jit":
            return batch
        spec = PartitionSpec(*([None] * batch_axis), AXIS)
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)

    def constrain_state(self, state: Any) -> Any:
        """In the step: under ``"jit"``, keep ``state`` laid out as :meth:`place_state` did."""
        if self.mode != "jit":
            return state
        return jax.lax.with_sharding_constraint(
            state, state_shardings(state, self.mesh, fsdp=self.fsdp)
        )

    def compile(
        self, fn: Callable[..., Any], *, donate_argnums: int | tuple[int, ...] = (), out_axes: Any
    ) -> Callable[..., Any]:
        """``fn`` compiled for this mode: ``jax.pmap`` over ``"data"``, else jft's ``jax.jit``.

        ``out_axes`` is ``jax.pmap``'s (unused by ``jax.jit``). ``jax.pmap`` takes
        no compiler options, so under ``"pmap"`` the CPU runs XLA's defaults.
        """
        if self.mode == "pmap":
            return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums, out_axes=out_axes)
        return OptionsJit(fn, donate_argnums=donate_argnums)


def place_state(state: Any, parallel: Parallel | str) -> Any:
    """``Parallel.of(parallel).place_state(state)``: an alias, for a mode given by name."""
    return Parallel.of(parallel).place_state(state)


def host_state(state: Any, parallel: Parallel | str) -> Any:
    """``Parallel.of(parallel).host_state(state)``: an alias, for a mode given by name."""
    return Parallel.of(parallel).host_state(state)


def shard_batch(local_batch: Mapping[str, Any], parallel: Parallel | str) -> Any:
    """``Parallel.of(parallel).shard_batch(local_batch)``: an alias, for a mode given by name."""
    return Parallel.of(parallel).shard_batch(local_batch)
