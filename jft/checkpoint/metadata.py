"""What a checkpoint holds, read without restoring any array: for ``jft inspect`` and the CLI."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jft.checkpoint import base as base_lib
from jft.checkpoint.failures import quiet_orbax, reason
from jft.checkpoint.fit import arrays_of
from jft.checkpoint.layout import (
    CheckpointError,
    checkpoint_dir,
    locate,
    read_json,
    resolve_step,
    step_dirs,
)

__all__ = ["CheckpointMetadata", "read_config", "read_metadata"]


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
      base: an adapter-only step's frozen base (``{"path", "hash", "arrays"}``), or None.
    """

    directory: str
    step: int | None
    steps: tuple[int, ...]
    arrays: dict[str, tuple[tuple[int, ...], str]]
    config: dict[str, Any]
    data_state: dict[str, Any]
    metrics: dict[str, float] | None
    base: dict[str, Any] | None = None


def _tree_arrays(path: str, what: str) -> dict[str, tuple[tuple[int, ...], str]]:
    import orbax.checkpoint as ocp

    quiet_orbax()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return arrays_of(ckptr.metadata(path).item_metadata)
    except Exception as e:
        raise CheckpointError(f"{what}: unreadable ({reason(e)})") from None


def read_metadata(path: str | os.PathLike, *, step: int | None = None) -> CheckpointMetadata:
    """Describes a step of a checkpoint directory (a workdir too) without restoring arrays.

    For ``jft inspect``: the paths, shapes and dtypes of the saved state
    (``.arrays``), the config, the data state and the metrics. ``step`` defaults
    to the latest; ``path`` may also be one step's folder. An orbax folder of
    variables (``jft export``) gives its arrays (``params/...``, ``batch_stats/...``)
    and nothing else.

    Raises:
      CheckpointError: no finished step, or its metadata cannot be read.
    """
    found = locate(path)
    if found is not None and found[0] == "tree":
        arrays = _tree_arrays(found[1], f"{found[1]}: orbax folder")
        return CheckpointMetadata(found[1], None, (), arrays, {}, {}, None)
    if found is not None and found[0] == "step":
        directory, step = found[1], found[2] if step is None else step
    else:
        directory = checkpoint_dir(path)
    s = resolve_step(directory, step)
    step_dir = os.path.join(directory, str(s))
    return CheckpointMetadata(
        directory=directory,
        step=s,
        steps=tuple(step_dirs(directory)),
        arrays=_tree_arrays(os.path.join(step_dir, "state"), f"checkpoint {directory} step {s}"),
        config=read_json(os.path.join(step_dir, "config", "metadata")) or {},
        data_state=read_json(os.path.join(step_dir, "data_state", "metadata")) or {},
        metrics=read_json(os.path.join(step_dir, "metrics", "metrics")),
        base=read_json(os.path.join(step_dir, base_lib.ITEM, "metadata")),
    )


def read_config(path: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """The config stored with a step (the latest by default) of a checkpoint folder or workdir."""
    directory = checkpoint_dir(path)
    s = resolve_step(directory, step)
    config = read_json(os.path.join(directory, str(s), "config", "metadata"))
    if not isinstance(config, dict):
        raise CheckpointError(
            f"checkpoint {directory} step {s}: its config is missing or unreadable"
        )
    return config
