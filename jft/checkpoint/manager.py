"""Training checkpoints on orbax: save every N steps, keep the last K and the best, resume exactly.

orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
when every item is written, so a save cut off (a SIGKILL) leaves only that
temporary folder: it is never restored and is removed by the next save. A
finished step whose files were later truncated or damaged is caught when
restored (orbax fails to read it, or an array's checksum differs); the
:class:`Checkpointer` then warns and restores the step before it, and moves the
damaged one aside (never deletes it) before its next save. Old steps are
deleted only after a newer one is complete. The folder layout is in
:mod:`jft.checkpoint.layout`.

With a frozen base (a LoRA run, ``frozen_base``) a step holds the state without
``state.frozen``: the adapters, the trained modules and their optimizer state.
The base is named in the step's ``base`` item by its path and a hash of its
arrays, and a restore puts the target's own base back after checking that hash.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax

from jft.checkpoint import base as base_lib
from jft.checkpoint import checksums as sums_lib
from jft.checkpoint import restore as restore_lib
from jft.checkpoint import retention
from jft.checkpoint.failures import is_io_error, quiet_orbax, why_written_failed
from jft.checkpoint.layout import ITEMS, CheckpointError, step_dirs
from jft.checkpoint.restore import Restored

__all__ = ["Checkpointer", "Restored"]

log = logging.getLogger(__name__)

_CORRUPT_PREFIX = "corrupt_step_"


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
      frozen_base: the path of the run's frozen base (a LoRA run; ``""`` for a
        random init): saves leave ``state.frozen`` out and name the base instead.
        None: saves hold the whole state.
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
        frozen_base: str | None = None,
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
        self.frozen_base = frozen_base
        self._base: dict[str, Any] | None = None  # base.describe of the state saved, once
        self._manager: Any = None
        self._writable = False
        self._corrupt: set[int] = set()
        self._in_flight: int | None = None  # the step of the last save started

    # -- orbax plumbing -----------------------------------------------------------------

    def _mngr(self, write: bool = False) -> Any:
        import orbax.checkpoint as ocp

        if self._manager is not None and (self._writable or not write):
            return self._manager
        if self._manager is not None:
            self._manager.close()
        if write:
            self._set_aside_corrupt()
        quiet_orbax()
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            **{name: ocp.JsonCheckpointHandler() for name in (*ITEMS[1:], base_lib.ITEM)},
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=retention.options(self, write), item_handlers=handlers
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
        return [s for s in step_dirs(self.directory) if s not in self._corrupt]

    def latest_step(self) -> int | None:
        """The newest finished step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest when none is tracked)."""
        return retention.best_step(self)

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
        extra = {}
        if self.frozen_base is not None:
            if self._base is None:  # the base never changes during a run
                self._base = base_lib.describe(self.frozen_base, state.frozen)
            extra[base_lib.ITEM] = ocp.args.JsonSave(self._base)
            state = state.replace(frozen={})
        sums, nonfinite = sums_lib.summary(state)
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
        data_state = sums_lib.jsonable(dict(data_state or {}))
        sums[sums_lib.DATA_STATE_KEY] = sums_lib.json_checksum(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(sums_lib.jsonable(config if config is not None else {})),
            checksums=ocp.args.JsonSave(sums),
            **extra,
        )
        try:
            # An asynchronous save that failed (a full disk) raises here, at the next one.
            started = manager.save(
                step, args=args, metrics=retention.metrics(self, metrics), force=True
            )
        except Exception as e:
            if not is_io_error(e):
                raise
            raise self._write_error(e, step) from None
        self._in_flight = step
        return bool(started)

    def _write_error(self, e: BaseException, step: int) -> CheckpointError:
        failed = self._in_flight if self._in_flight is not None else step
        self._in_flight = None
        done = [s for s in step_dirs(self.directory) if s < failed]
        kept = f"step {done[-1]} is the last complete one" if done else "no step is complete"
        return CheckpointError(
            f"checkpoint {self.directory} step {failed} could not be written "
            f"({why_written_failed(e)}); "
            f"{kept}: free space or choose another --workdir, then run again to resume"
        )

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
                if not is_io_error(e):
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

    def restore(self, target_state: Any = None, *, step: int | None = None) -> Restored:
        """Restores a step (the latest by default) onto the shapes and shardings of a target.

        Args:
          target_state: a state of arrays, or of ``jax.ShapeDtypeStruct`` with
            ``.sharding``, shaped like the saved one; the restored arrays take its
            shardings (one device, a replicated or FSDP-sharded mesh), so a
            checkpoint saved on any topology restores onto any other. Leaves
            without a sharding (NumPy arrays) go to the first device. For pmap,
            restore the canonical state and replicate it. None: the state as
            saved, nested dicts of arrays on the first device (no model needed;
            an adapter-only step then has no ``frozen`` and names its base in
            ``Restored.base``). An adapter-only step restores onto a target whose
            ``frozen`` holds the base's arrays, which the restored state keeps.
          step: the step to restore; None for the latest good one.

        Returns:
          A :class:`Restored`.

        Raises:
          CheckpointError: the checkpoint holds a different model (one line
            naming the first paths whose shapes or dtypes differ, or that only one
            side has; nothing in the directory is touched) or was trained on
            another base (naming both); the requested step does not exist or is
            damaged; or no step could be restored. A damaged latest step
            (unreadable, truncated, a checksum that differs) is skipped with a
            warning naming it and the reason, and the step before it is restored.
        """
        self.wait()
        restored, damaged = restore_lib.restore(
            self, self._mngr, self.all_steps(), target_state, step
        )
        self._corrupt.update(damaged)
        return restored
