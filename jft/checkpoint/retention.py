"""Which steps a checkpoint directory keeps: the last ``keep`` and the best by one metric."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jft.checkpoint.layout import read_json

__all__ = ["best_step", "metrics", "options"]


def options(ckpt: Any, write: bool) -> Any:
    """The orbax ``CheckpointManagerOptions`` of a :class:`jft.checkpoint.Checkpointer`.

    Read-only managers create nothing and delete nothing; a writing one keeps the
    latest ``ckpt.keep`` steps and the best by ``ckpt.best_metric``, and removes
    the temporary folders of saves that were cut off.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    if not write:
        return ocp.CheckpointManagerOptions(
            read_only=True, save_interval_steps=0, create=False, max_to_keep=None
        )
    preserve: list[Any] = [policies.LatestN(n=ckpt.keep)]
    best_fn = None
    if ckpt.best_metric:
        metric = ckpt.best_metric

        def best_fn(metrics: Mapping[str, float]) -> float:
            return float(metrics[metric])

        preserve.append(
            policies.BestN(
                get_metric_fn=best_fn,
                reverse=ckpt.best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=ckpt.best_mode,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=ckpt.async_save,
        cleanup_tmp_directories=True,
        create=True,
    )


def best_step(ckpt: Any) -> int | None:
    """The step of ``ckpt`` with the best ``best_metric`` (the latest when none is tracked)."""
    if not ckpt.best_metric:
        return ckpt.latest_step()
    best, best_value = None, None
    for step in ckpt.all_steps():
        metrics = read_json(os.path.join(ckpt.directory, str(step), "metrics", "metrics"))
        if not metrics or ckpt.best_metric not in metrics:
            continue
        value = float(metrics[ckpt.best_metric])
        if best_value is None or (
            value > best_value if ckpt.best_mode == "max" else value < best_value
        ):
            best, best_value = step, value
    return best


def metrics(ckpt: Any, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The finite scalars of ``metrics`` orbax keeps with a step, when they hold the best metric."""
    if not ckpt.best_metric or not metrics or ckpt.best_metric not in metrics:
        return None
    out = {}
    for k, v in metrics.items():
        if np.ndim(v) == 0:
            v = float(np.asarray(v))
            if math.isfinite(v):
                out[k] = v
    return out if ckpt.best_metric in out else None
