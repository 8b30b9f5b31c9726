"""The one way jft reads and writes model variables in orbax folders, without a model.

Three kinds of folder hold variables, recognised by :func:`jft.checkpoint.layout.locate`:
a run's workdir or checkpoint directory (its latest good step), one step's
folder, and a bare orbax folder of variables (``jft export``, ``jft convert``).
A run's steps are read by :meth:`jft.checkpoint.Checkpointer.restore` with no
target, so a damaged step falls back to the one before, as a resume would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jft import partition
from jft.checkpoint.failures import quiet_orbax, reason
from jft.checkpoint.fit import as_stored
from jft.checkpoint.layout import CheckpointError, locate
from jft.checkpoint.manager import Checkpointer

__all__ = ["read_variables", "save_variables"]


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes ``variables`` (a pytree of arrays) as an orbax folder; ``path`` must not exist."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise CheckpointError(f"{path}: already exists; jft does not overwrite checkpoints")
    quiet_orbax()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, dict(variables))
        ckptr.wait_until_finished()


def _read_tree(path: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    quiet_orbax()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            target = as_stored(ckptr.metadata(path).item_metadata)
            return ckptr.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable orbax folder ({reason(e)})") from None


def read_variables(
    path: str | os.PathLike, *, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model variables in an orbax folder, as nested dicts of NumPy arrays.

    Args:
      path: a run's workdir or checkpoint directory (the latest good step, or
        ``step``), one step's folder, or an orbax folder of variables.
      step: the step of a run to read.

    Returns:
      ``(variables, base)``: ``{"params": ..., "batch_stats": ...}`` (a run's
      trainable and frozen parameters merged back into ``params``) and, for an
      adapter-only step (a LoRA run), its frozen base (``{"path", "hash",
      "arrays"}``), whose arrays ``params`` then lacks; else None.

    Raises:
      CheckpointError: ``path`` is none of these, or no step can be read (one line).
    """
    found = locate(path)
    if found is None:
        raise CheckpointError(
            f"{os.path.abspath(os.fspath(path))}: not a run, a checkpoint step or an orbax folder"
        )
    kind, where, at = found
    if kind == "tree":
        return jax.tree.map(np.asarray, _read_tree(where)), None
    ckpt = Checkpointer(where, every=0)
    try:
        restored = ckpt.restore(None, step=at if step is None else step)
    finally:
        ckpt.close()
    state = jax.tree.map(np.asarray, restored.state)
    variables = {"params": partition.merge(state.get("trainable") or {}, state.get("frozen") or {})}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables, restored.base
