"""Training checkpoints on orbax: save every N steps, keep the last K and the best, resume exactly.

A checkpoint directory holds one sub-folder per step, written by an orbax
``CheckpointManager``::

    <directory>/<step>/state/         the TrainState (orbax PyTree, OCDBT)
    <directory>/<step>/data_state/    the data iterator's state (JSON)
    <directory>/<step>/config/        the run's config (JSON)
    <directory>/<step>/checksums/     a checksum per array of the state (JSON)
    <directory>/<step>/metrics/       the eval metrics, when the best one is tracked

orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
when every item is written, so a save cut off (a SIGKILL) leaves only that
temporary folder: it is never restored and is removed by the next save. A
finished step whose files were later truncated or damaged is caught when
restored (orbax fails to read it, or an array's checksum differs); the
:class:`Checkpointer` then warns and restores the step before it. Old steps are
deleted only after a newer one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError

log = logging.getLogger(__name__)

ITEMS = ("state", "data_state", "config", "checksums")
_TMP_MARK = ".orbax-checkpoint-tmp"
_CORRUPT_PREFIX = "corrupt_step_"
_MAX_LISTED = 4


class CheckpointError(JftError, ValueError):
    """A checkpoint cannot be restored or written; one line says which and why."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      state: the restored state, with the shapes, dtypes and shardings of the target.
      data_state: the data iterator's state saved with it (``{}`` if none was).
      config: the run's config saved with it, as a plain dict.
      step: the checkpoint's step.
    """

    state: Any
    data_state: dict[str, Any]
    config: dict[str, Any]
    step: int


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What :func:`read_metadata` finds in a checkpoint, without restoring any array.

    Attributes:
      directory: the checkpoint directory (the parent of the step folders).
      step: the step described (None for an exported folder of variables).
      steps: every finished step in the directory, in increasing order.
      arrays: ``path -> (shape, dtype name)`` of every array of the saved state,
        e.g. ``"trainable/backbone/conv1/kernel" -> ((3, 3, 1, 8), "float32")``.
      config: the run's config saved with the step.
      data_state: the data iterator's state saved with the step.
      metrics: the eval metrics saved with the step, or None.
    """

    directory: str
    step: int | None
    steps: tuple[int, ...]
    arrays: dict[str, tuple[tuple[int, ...], str]]
    config: dict[str, Any]
    data_state: dict[str, Any]
    metrics: dict[str, float] | None


def checkpoint_dir(path: str | os.PathLike) -> str:
    """The checkpoint directory of ``path``: ``<path>/checkpoints`` for a workdir, else ``path``."""
    path = os.path.abspath(os.fspath(path))
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def _step_dirs(directory: str) -> list[int]:
    # Finished steps only: orbax renames a step's folder to its bare number once complete.
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


def _is_orbax_tree(path: str) -> bool:
    # A bare orbax PyTree checkpoint (jft.weights.save_checkpoint, export to a folder).
    return os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(
        os.path.join(path, "_CHECKPOINT_METADATA")
    )


def is_checkpoint_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a run's workdir or checkpoint directory with a finished step,
    or an orbax parameters folder written by :func:`jft.train.export`."""
    if path is None or not os.path.isdir(os.fspath(path)):
        return False
    directory = checkpoint_dir(path)
    return bool(_step_dirs(directory)) or _is_orbax_tree(os.path.abspath(os.fspath(path)))


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(key_path: Sequence[Any]) -> str:
    return "/".join(_key_name(k) for k in key_path)


def _flat_with_paths(tree: Any) -> dict[str, Any]:
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_uint32(x: jax.Array) -> jax.Array:
    # The bits of x, widened to uint32 (64-bit types become a trailing pair of words).
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 4:
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

# The groups of a state that hold parameters and statistics: a NaN or Inf there is
# poison. (An optimizer state may hold Inf on purpose: reduce_on_plateau's best value.)
_PARAM_GROUPS = ("trainable", "frozen", "batch_stats", "params")
_DATA_STATE_KEY = "#data_state"


def checksums(state: Any) -> dict[str, int]:
    """A uint32 checksum of each array of ``state``, by path; equal on any topology."""
    sums = jax.device_get(_checksums_jit(state))
    return {path: int(v) for path, v in _flat_with_paths(sums).items()}


def _summary(state: Any) -> tuple[dict[str, int], list[str]]:
    """The checksums of ``state`` and the paths of its parameters that hold NaN or Inf."""
    sums, finite = jax.device_get(_summary_jit(state))
    bad = [
        path
        for path, ok in _flat_with_paths(finite).items()
        if not bool(ok) and path.split("/", 1)[0] in _PARAM_GROUPS
    ]
    return {path: int(v) for path, v in _flat_with_paths(sums).items()}, bad


def _json_checksum(obj: Any) -> int:
    return zlib.crc32(json.dumps(obj, sort_keys=True).encode())


def _jsonable(obj: Any) -> Any:
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


def _is_io_error(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a failure of the file system, not a bug."""
    seen = 0
    while e is not None and seen < 20:
        text = str(e)
        if isinstance(e, OSError) or "os_error_code=" in text or "RESOURCE_EXHAUSTED" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _why_oserror(e: OSError) -> str:
    import errno

    known = {errno.ENOSPC: "the disk is full", errno.EROFS: "a read-only file system"}
    return known.get(e.errno, f"{e.strerror or type(e).__name__}: {e.filename or ''}".strip())


class _OrbaxErrorsReported(logging.Filter):
    """Drops orbax's error logs (tracebacks of its threads): jft raises them as one line.

    ``JFT_DEBUG=1`` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("JFT_DEBUG", "") not in ("", "0"):
            return True
        # absl names itself as the caller of logging.exception: orbax's lines also
        # start with "[process=N]".
        from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "") or str(
            record.msg
        ).startswith("[process=")
        return not from_orbax


_ORBAX_FILTER = _OrbaxErrorsReported()


def _quiet_closed_loops() -> None:
    """Drops "Event loop is closed" from tensorstore callbacks into orbax's finished loops.

    After a failed read or write, tensorstore completes its futures on event loops
    that orbax has already closed; Python prints each as an unraisable traceback
    (dozens of lines) although nothing is lost: jft reports the failure itself.
    ``JFT_DEBUG=1`` keeps them.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jft", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        debug = os.environ.get("JFT_DEBUG", "") not in ("", "0")
        if not debug and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jft = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= 240 else text[:237] + "..."


def _abstract(target_state: Any) -> Any:
    """ShapeDtypeStructs with shardings: those of the target, else the first device."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(
            np.shape(x), np.result_type(x.dtype), sharding=sharding or default
        )

    return jax.tree.map(one, target_state)


def _fit_problems(
    stored: Mapping[str, tuple[tuple[int, ...], str]], target: Mapping[str, Any]
) -> list[str]:
    problems = []  # (sort key, text)
    for path, (shape, dtype) in stored.items():
        if path not in target:
            problems.append((path, len(shape), f"{path} is in the checkpoint but not in the model"))
            continue
        t = target[path]
        if tuple(t.shape) != tuple(shape):
            text = f"{path} is {tuple(shape)} in the checkpoint and {tuple(t.shape)} in the model"
            problems.append((path, len(shape), text))
        elif np.dtype(t.dtype).name != dtype:
            text = f"{path} is {dtype} in the checkpoint and {np.dtype(t.dtype).name} in the model"
            problems.append((path, len(shape), text))
    for path, t in target.items():
        if path not in stored:
            problems.append(
                (path, len(t.shape), f"{path} is in the model but not in the checkpoint")
            )

    # Parameters first, kernels before vectors: they say what differs; the BatchNorm
    # statistics and optimizer slots of the same layers only repeat it.
    def rank(item: tuple[str, int, str]) -> tuple[int, int, str]:
        path, ndim, _ = item
        group = path.split("/", 1)[0]
        order = {"trainable": 0, "frozen": 0, "params": 0, "batch_stats": 1, "opt_state": 3}
        return order.get(group, 2), -ndim, path

    return [text for *_, text in sorted(problems, key=rank)]


def _pmap_hint(stored: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    # Each target leaf is the stored one with one more leading axis of one size: pmap's.
    leading = set()
    for path, t in target.items():
        shape = tuple(t.shape)
        if path not in stored or shape[1:] != tuple(stored[path][0]) or not shape:
            return ""
        leading.add(shape[0])
    if len(leading) != 1:
        return ""
    return " (a pmap state? restore the canonical state, then replicate it)"


def _arrays_of(tree_metadata: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return {
        path: (tuple(int(d) for d in m.shape), np.dtype(m.dtype).name)
        for path, m in _flat_with_paths(tree).items()
    }


class Checkpointer:
    """Saves and restores training checkpoints in one directory (an orbax ``CheckpointManager``).

    A checkpoint holds the :class:`jft.train.TrainState` (params, optimizer state,
    step, rng, batch_stats...), the data iterator's state and the config. The
    last ``keep`` steps are kept, plus the best one by ``best_metric``; older
    ones are deleted only once a newer save is complete. Saves are asynchronous
    (``async_save``): :meth:`save` returns once the arrays are copied off the
    devices, so the caller may donate them to the next step.

    Nothing is written to the directory before the first :meth:`save`, so
    restoring (or failing to restore) leaves it as it was.

    Args:
      directory: the checkpoint directory, created on the first save.
      every: save when ``step % every == 0`` (0: only forced saves).
      keep: how many of the latest steps to keep (at least 1).
      best_metric: the metric (a key of ``save(metrics=...)``, e.g.
        ``"eval/accuracy"``) whose best step is kept too; None to keep only the latest.
      best_mode: ``"max"`` or ``"min"``: which value of ``best_metric`` is best.
      async_save: write in a background thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if every is None or every < 0:
            raise CheckpointError(
                f"checkpoint every={every!r}: must be 0 (off) or a positive step count"
            )
        if keep is None or keep < 1:
            raise CheckpointError(f"checkpoint keep={keep!r}: must keep at least 1 checkpoint")
        if best_mode not in ("max", "min"):
            raise CheckpointError(f"checkpoint best_mode={best_mode!r}: must be 'max' or 'min'")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = int(every)
        self.keep = int(keep)
        self.best_metric = best_metric or None
        self.best_mode = best_mode
        self.async_save = bool(async_save)
        self._manager: Any = None
        self._writable = False
        self._corrupt: set[int] = set()
        self._in_flight: int | None = None  # the step of the last save started

    # -- orbax plumbing -----------------------------------------------------------------

    def _options(self, write: bool) -> Any:
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        if not write:
            return ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, create=False, max_to_keep=None
            )
        preserve: list[Any] = [policies.LatestN(n=self.keep)]
        best_fn = None
        if self.best_metric:
            metric = self.best_metric

            def best_fn(metrics: Mapping[str, float]) -> float:
                return float(metrics[metric])

            preserve.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=self.best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        return ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=self.best_mode,
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )

    def _mngr(self, write: bool = False) -> Any:
        import orbax.checkpoint as ocp

        if self._manager is not None and (self._writable or not write):
            return self._manager
        if self._manager is not None:
            self._manager.close()
        if write:
            self._set_aside_corrupt()
        absl_logger = logging.getLogger("absl")
        if _ORBAX_FILTER not in absl_logger.filters:
            absl_logger.addFilter(_ORBAX_FILTER)
        _quiet_closed_loops()
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            **{name: ocp.JsonCheckpointHandler() for name in ITEMS[1:]},
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=self._options(write), item_handlers=handlers
        )
        self._writable = write
        return self._manager

    def _set_aside_corrupt(self) -> None:
        # A damaged step that restore skipped would block a new save of that step and
        # count among the kept ones: move it out of the way (never delete it).
        for step in sorted(self._corrupt):
            src = os.path.join(self.directory, str(step))
            if jax.process_index() != 0 or not os.path.isdir(src):
                continue
            dst = os.path.join(self.directory, f"{_CORRUPT_PREFIX}{step}")
            if os.path.exists(dst):
                dst += f".{int(time.time())}"
            os.rename(src, dst)
            msg = f"checkpoint {self.directory} step {step} is damaged; moved it to {dst}"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self._corrupt.clear()

    # -- public API ------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The finished steps in the directory (minus any found damaged), increasing.

        A save in flight counts once it is complete (see :meth:`wait`).
        """
        # Read from disk, not orbax's cache: that also lists a step still being written.
        return [s for s in _step_dirs(self.directory) if s not in self._corrupt]

    def latest_step(self) -> int | None:
        """The newest finished step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest when none is tracked)."""
        if not self.best_metric:
            return self.latest_step()
        best, best_value = None, None
        for step in self.all_steps():
            metrics = _read_json(os.path.join(self.directory, str(step), "metrics", "metrics"))
            if not metrics or self.best_metric not in metrics:
                continue
            value = float(metrics[self.best_metric])
            if best_value is None or (
                value > best_value if self.best_mode == "max" else value < best_value
            ):
                best, best_value = step, value
        return best

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Mapping[str, Any] | None,
        config: Any,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint at ``step`` if ``step % every == 0`` or ``force``.

        Args:
          step: the number of steps taken.
          state: the canonical state (no pmap device axis; any jit sharding), a
            pytree of arrays such as :class:`jft.train.TrainState`.
          data_state: the data iterator's state after this step's batch (JSON-able).
          config: the run's config (a ``ConfigDict`` or a mapping), stored as JSON.
          metrics: scalar metrics (``{"eval/accuracy": 0.9}``); the best step by
            ``best_metric`` is kept. Steps without ``best_metric`` among them are
            kept only while among the latest ``keep``.
          force: save whatever the step (the last step, SIGTERM).

        Returns:
          Whether a save started (False when not due or already saved at ``step``).
        """
        import orbax.checkpoint as ocp

        step = int(step)
        if not force and not (self.every and step % self.every == 0):
            return False
        sums, nonfinite = _summary(state)
        if nonfinite:
            latest = self.latest_step()
            kept = (
                f"the last checkpoint, step {latest}, is kept"
                if latest is not None
                else "no checkpoint was written"
            )
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} not written: {nonfinite[0]} holds "
                f"NaN or Inf; {kept} (check the init weights, lower the learning rate or "
                "set clip_grad_norm)"
            )
        manager = self._mngr(write=True)
        if step in manager.all_steps():
            return False
        data_state = _jsonable(dict(data_state or {}))
        sums[_DATA_STATE_KEY] = _json_checksum(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(_jsonable(config if config is not None else {})),
            checksums=ocp.args.JsonSave(sums),
        )
        try:
            # An asynchronous save that failed (a full disk) raises here, at the next one.
            started = manager.save(step, args=args, metrics=self._metrics(metrics), force=True)
        except Exception as e:
            if not _is_io_error(e):
                raise
            raise self._write_error(e, step) from None
        self._in_flight = step
        return bool(started)

    def _write_error(self, e: BaseException, step: int) -> CheckpointError:
        failed = self._in_flight if self._in_flight is not None else step
        self._in_flight = None
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        why = _why_oserror(cause) if isinstance(cause, OSError) else _reason(e)
        text = str(cause)  # tensorstore reports the errno inside a ValueError
        if "No space left on device" in text or "os_error_code='28'" in text:
            why = "the disk is full"
        elif "Read-only file system" in text or "os_error_code='30'" in text:
            why = "a read-only file system"
        done = [s for s in _step_dirs(self.directory) if s < failed]
        kept = f"step {done[-1]} is the last complete one" if done else "no step is complete"
        return CheckpointError(
            f"checkpoint {self.directory} step {failed} could not be written ({why}); "
            f"{kept}: free space or choose another --workdir, then run again to resume"
        )

    def _metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        if not self.best_metric or not metrics or self.best_metric not in metrics:
            return None
        out = {}
        for k, v in metrics.items():
            if np.ndim(v) == 0:
                v = float(np.asarray(v))
                if math.isfinite(v):
                    out[k] = v
        return out if self.best_metric in out else None

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is complete and old steps are deleted.

        Raises:
          CheckpointError: the save in flight failed (a full disk): one line naming
            the step and why.
        """
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except Exception as e:
                if not _is_io_error(e):
                    raise
                raise self._write_error(e, self._in_flight or 0) from None
            self._in_flight = None

    def close(self) -> None:
        """Waits for the save in flight and releases orbax's threads; safe to call twice."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None
            self._writable = False

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def restore(self, target_state: Any, *, step: int | None = None) -> Restored:
        """Restores a step (the latest by default) onto the shapes and shardings of a target.

        Args:
          target_state: a state of arrays, or of ``jax.ShapeDtypeStruct`` with
            ``.sharding``, shaped like the saved one; the restored arrays take its
            shardings (one device, a replicated or FSDP-sharded mesh), so a
            checkpoint saved on any topology restores onto any other. Leaves
            without a sharding (NumPy arrays) go to the first device. For pmap,
            restore the canonical state and replicate it.
          step: the step to restore; None for the latest good one.

        Returns:
          A :class:`Restored`.

        Raises:
          CheckpointError: the checkpoint holds a different model (one line
            naming the first paths whose shapes or dtypes differ, or that only one
            side has; nothing in the directory is touched); the requested step does
            not exist or is damaged; or no step could be restored. A damaged latest
            step (unreadable, truncated, a checksum that differs) is skipped with a
            warning naming it and the reason, and the step before it is restored.
        """
        import orbax.checkpoint as ocp

        self.wait()
        available = self.all_steps()
        if step is not None:
            if int(step) not in available:
                raise CheckpointError(
                    f"checkpoint {self.directory} has no step {step} "
                    f"(it has {', '.join(map(str, available)) or 'none'})"
                )
            candidates = [int(step)]
        else:
            candidates = available[::-1]
        if not candidates:
            raise CheckpointError(f"checkpoint {self.directory}: no finished checkpoint to restore")
        target = _abstract(target_state)
        target_flat = _flat_with_paths(target)
        manager = self._mngr()
        failures = []
        # The newest step whose arrays differ from the model's: a different model, unless
        # an older step fits (then that step's metadata is damaged).
        mismatch: str | None = None
        for s in candidates:
            try:
                stored = _arrays_of(manager.item_metadata(s)["state"])
                if not stored:
                    raise ValueError("its array metadata is missing")
            except Exception as e:  # orbax/tensorstore raise many types for bad files
                failures.append((s, _reason(e)))
                continue
            problems = _fit_problems(stored, target_flat)
            if problems:
                more = len(problems) - _MAX_LISTED
                mismatch = mismatch or (
                    f"checkpoint {self.directory} step {s} does not fit this model: "
                    + "; ".join(problems[:_MAX_LISTED])
                    + (f"; and {more} more" if more > 0 else "")
                    + _pmap_hint(stored, target_flat)
                )
                failures.append((s, "its arrays differ from the older steps'"))
                continue
            try:
                out = manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        **{name: ocp.args.JsonRestore() for name in ITEMS[1:]},
                    ),
                )
                _verify(out["state"], out["checksums"], out["data_state"])
            except Exception as e:
                failures.append((s, _reason(e)))
                continue
            _refuse_nonfinite(self.directory, s, out["state"], available)
            self._report(failures, s)
            return Restored(
                out["state"], dict(out["data_state"] or {}), dict(out["config"] or {}), s
            )
        if mismatch is not None:
            raise CheckpointError(mismatch)
        raise CheckpointError(_none_restored(self.directory, failures))

    def _report(self, failures: list[tuple[int, str]], restored: int) -> None:
        # One warning line for the fallback, naming every step skipped and why.
        if not failures:
            return
        self._corrupt.update(s for s, _ in failures)
        (first, reason), *more = failures
        also = "".join(f", and so is step {s} ({r})" for s, r in more)
        msg = (
            f"checkpoint {self.directory} step {first} is damaged or incomplete ({reason})"
            f"{also}; restoring step {restored} instead"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _none_restored(directory: str, failures: list[tuple[int, str]]) -> str:
    first_s, first_reason = failures[0]
    others = ", ".join(str(s) for s, _ in failures[1:])
    return (
        f"checkpoint {directory}: no step could be restored: step {first_s} is damaged "
        f"({first_reason})"
        + (f", and so are steps {others}" if others else "")
        + f"; move {directory} aside to start over"
    )


def _refuse_nonfinite(directory: str, step: int, state: Any, steps: Sequence[int]) -> None:
    _, bad = _summary(state)
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


def _verify(state: Any, expected: Mapping[str, int] | None, data_state: Any = None) -> None:
    if expected is None:
        raise ValueError("its checksums are missing")
    expected = dict(expected)
    data_sum = expected.pop(_DATA_STATE_KEY, None)
    if data_state is not None and data_sum is not None:
        if _json_checksum(_jsonable(data_state)) != data_sum:
            raise ValueError("its data_state differs from the one saved (checksum mismatch)")
    got = checksums(state)
    bad = [p for p in expected if got.get(p) != expected[p]]
    if bad or set(got) != set(expected):
        raise ValueError(f"checksum mismatch in {', '.join(bad[:3]) or 'the array list'}")


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _resolve_step(directory: str, step: int | None) -> int:
    steps = _step_dirs(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint in it")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise CheckpointError(
            f"checkpoint {directory} has no step {step} (it has {', '.join(map(str, steps))})"
        )
    return int(step)


def read_metadata(path: str | os.PathLike, *, step: int | None = None) -> CheckpointMetadata:
    """Describes a step of a checkpoint directory (a workdir too) without restoring arrays.

    For ``jft inspect``: the paths, shapes and dtypes of the saved state
    (``.arrays``), the config, the data state and the metrics. ``step`` defaults
    to the latest. An orbax folder written by :func:`jft.train.export` gives its
    arrays (``params/...``, ``batch_stats/...``) and nothing else.

    Raises:
      CheckpointError: no finished step, or its metadata cannot be read.
    """
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(path)
    if not _step_dirs(directory) and _is_orbax_tree(directory):
        # An exported folder of variables: arrays only.
        try:
            with ocp.StandardCheckpointer() as ckptr:
                arrays = _arrays_of(ckptr.metadata(directory).item_metadata)
        except Exception as e:
            raise CheckpointError(f"{directory}: unreadable orbax folder ({_reason(e)})") from None
        return CheckpointMetadata(directory, None, (), arrays, {}, {}, None)
    s = _resolve_step(directory, step)
    step_dir = os.path.join(directory, str(s))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = _arrays_of(ckptr.metadata(os.path.join(step_dir, "state")).item_metadata)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {directory} step {s}: unreadable ({_reason(e)})"
        ) from None
    return CheckpointMetadata(
        directory=directory,
        step=s,
        steps=tuple(_step_dirs(directory)),
        arrays=arrays,
        config=_read_json(os.path.join(step_dir, "config", "metadata")) or {},
        data_state=_read_json(os.path.join(step_dir, "data_state", "metadata")) or {},
        metrics=_read_json(os.path.join(step_dir, "metrics", "metrics")),
    )


def read_config(path: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """The config stored with a step (the latest by default) of a checkpoint folder or workdir."""
    directory = checkpoint_dir(path)
    s = _resolve_step(directory, step)
    config = _read_json(os.path.join(directory, str(s), "config", "metadata"))
    if not isinstance(config, dict):
        raise CheckpointError(
            f"checkpoint {directory} step {s}: its config is missing or unreadable"
        )
    return config


def _restore_untyped(directory: str, step: int | None) -> tuple[dict[str, Any], int]:
    """The saved state as nested dicts of NumPy arrays (no model needed), and its step."""
    import orbax.checkpoint as ocp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck = Checkpointer(directory, every=0)
    steps = ck.all_steps() if step is None else [_resolve_step(directory, step)]
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint in it")
    failures = []
    manager = ck._mngr()
    try:
        for s in sorted(steps, reverse=True):
            try:
                meta = manager.item_metadata(s)["state"]
                tree = getattr(meta, "tree", meta)
                target = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree
                )
                out = manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), checksums=ocp.args.JsonRestore()
                    ),
                )
                _verify(out["state"], out["checksums"])
            except Exception as e:
                failures.append((s, _reason(e)))
                continue
            _refuse_nonfinite(directory, s, out["state"], steps)
            ck._report(failures, s)
            return jax.tree.map(np.asarray, out["state"]), s
    finally:
        ck.close()
    raise CheckpointError(_none_restored(directory, failures))


def read_params(path: str | os.PathLike, *, step: int | None = None) -> dict[str, np.ndarray]:
    """The model variables of a checkpoint, flat: ``params/backbone/conv1/kernel`` -> array.

    ``path`` is a run's workdir or checkpoint directory (the latest good step, or
    ``step``; trainable and frozen parameters are merged back into ``params/``,
    BatchNorm statistics are under ``batch_stats/``), or an orbax folder of
    variables (:func:`jft.train.export`, :func:`jft.weights.save_checkpoint`).
    The names are what the ``"jft"`` key map of :func:`jft.weights.restore` takes.
    """
    from flax import traverse_util

    from jft import partition

    root = os.path.abspath(os.fspath(path))
    directory = checkpoint_dir(root)
    if not _step_dirs(directory) and _is_orbax_tree(root):
        from jft.weights import load_checkpoint

        variables = load_checkpoint(root)
    else:
        state, _ = _restore_untyped(directory, step)
        variables = {
            "params": partition.merge(state.get("trainable") or {}, state.get("frozen") or {})
        }
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
    flat = traverse_util.flatten_dict(variables, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}
