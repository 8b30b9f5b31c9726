"""Restoring a step of a run: the latest good one onto a target's shapes and shardings.

:meth:`jft.checkpoint.Checkpointer.restore` calls :func:`restore`: it tries the
requested step, or the steps newest first, skips any that is damaged (unreadable,
truncated, a checksum that differs) with one warning line, and tells a different
model (arrays that differ from the target's) from damage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from jft.checkpoint import base as base_lib
from jft.checkpoint import checksums as sums_lib
from jft.checkpoint import fit
from jft.checkpoint.failures import none_restored, reason
from jft.checkpoint.layout import ITEMS, CheckpointError, read_json

__all__ = ["Restored", "restore"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      state: the restored state, with the shapes, dtypes and shardings of the target.
      data_state: the data iterator's state saved with it (``{}`` if none was).
      config: the run's config saved with it, as a plain dict.
      step: the checkpoint's step.
      base: for an adapter-only step, its frozen base: ``{"path", "hash", "arrays"}``
        (``arrays``: ``path -> [checksum, shape, dtype]`` of each array of
        ``state.frozen``); None for a step that holds the whole state.
    """

    state: Any
    data_state: dict[str, Any]
    config: dict[str, Any]
    step: int
    base: dict[str, Any] | None = None


def restore(
    ckpt: Any,
    manager_fn: Callable[[], Any],
    available: list[int],
    target_state: Any = None,
    step: int | None = None,
) -> tuple[Restored, list[int]]:
    """Restores ``step`` (the latest good one when None) of ``ckpt`` onto ``target_state``.

    Args:
      ckpt: the :class:`jft.checkpoint.Checkpointer` (its ``directory`` and ``frozen_base``).
      manager_fn: opens its read-only orbax ``CheckpointManager`` (only once a step exists).
      available: its finished steps, increasing.
      target_state: as :meth:`jft.checkpoint.Checkpointer.restore` takes it.
      step: the step to restore; None for the latest good one.

    Returns:
      ``(restored, damaged)``: the :class:`Restored` and the newer steps skipped as
      damaged (one warning line names them), which the caller keeps out of its steps.

    Raises:
      CheckpointError: as :meth:`jft.checkpoint.Checkpointer.restore` says.
    """
    if step is not None:
        if int(step) not in available:
            raise CheckpointError(
                f"checkpoint {ckpt.directory} has no step {step} "
                f"(it has {', '.join(map(str, available)) or 'none'})"
            )
        candidates = [int(step)]
    else:
        candidates = available[::-1]
    if not candidates:
        raise CheckpointError(f"checkpoint {ckpt.directory}: no finished checkpoint to restore")
    manager = manager_fn()
    failures: list[tuple[int, str]] = []
    # The newest step whose arrays differ from the model's: a different model, unless
    # an older step fits (then that step's metadata is damaged).
    mismatch: str | None = None
    for s in candidates:
        base = read_json(os.path.join(ckpt.directory, str(s), base_lib.ITEM, "metadata"))
        try:
            meta = manager.item_metadata(s)["state"]
            stored = fit.arrays_of(meta)
            if not stored:
                raise ValueError("its array metadata is missing")
        except Exception as e:  # orbax/tensorstore raise many types for bad files
            failures.append((s, reason(e)))
            continue
        if target_state is None:
            target = fit.as_stored(meta)
        else:
            target = fit.abstract(base_lib.without_base(target_state, base, ckpt, s))
            mismatch_here = fit.mismatch(
                ckpt.directory, s, stored, sums_lib.flat_with_paths(target)
            )
            if mismatch_here is not None:
                mismatch = mismatch or mismatch_here
                failures.append((s, "its arrays differ from the older steps'"))
                continue
        try:
            # Variables alone (no target) need neither the data state nor the config.
            items = ITEMS[1:] if target_state is not None else ("checksums",)
            out = _read_step(manager, s, target, items)
            sums_lib.verify(out["state"], out["checksums"], out.get("data_state"))
        except Exception as e:
            failures.append((s, reason(e)))
            continue
        sums_lib.refuse_nonfinite(ckpt.directory, s, out["state"], available)
        _report(ckpt.directory, failures, s)
        state = out["state"]
        if base is not None and target_state is not None:
            state = state.replace(frozen=target_state.frozen)
        data_state, config = out.get("data_state") or {}, out.get("config") or {}
        damaged = [f for f, _ in failures]
        return Restored(state, dict(data_state), dict(config), s, base), damaged
    if mismatch is not None:
        raise CheckpointError(mismatch)
    raise CheckpointError(none_restored(ckpt.directory, failures))


def _read_step(manager: Any, step: int, target: Any, items: tuple[str, ...]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            **{name: ocp.args.JsonRestore() for name in items},
        ),
    )


def _report(directory: str, failures: list[tuple[int, str]], restored: int) -> None:
    # One warning line for the fallback, naming every step skipped and why.
    if not failures:
        return
    (first, why), *more = failures
    also = "".join(f", and so is step {s} ({r})" for s, r in more)
    msg = (
        f"checkpoint {directory} step {first} is damaged or incomplete ({why})"
        f"{also}; restoring step {restored} instead"
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)  # the caller of Checkpointer.restore
