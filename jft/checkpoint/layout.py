"""Where things are in a checkpoint folder, and the one rule that recognises each kind.

A run's checkpoint directory holds one sub-folder per finished step, written by
:class:`jft.checkpoint.Checkpointer`::

    <workdir>/checkpoints/<step>/state/       the TrainState (orbax PyTree, OCDBT)
    <workdir>/checkpoints/<step>/data_state/  the data iterator's state (JSON)
    <workdir>/checkpoints/<step>/config/      the run's config (JSON)
    <workdir>/checkpoints/<step>/checksums/   a checksum per array of the state (JSON)
    <workdir>/checkpoints/<step>/metrics/     the eval metrics, when the best one is tracked
    <workdir>/checkpoints/<step>/base/        the frozen base of an adapter-only (LoRA) step

An orbax folder of variables (:func:`jft.checkpoint.save_variables`,
``jft export``, ``jft convert``) is a bare orbax PyTree: it has a
``_CHECKPOINT_METADATA`` or ``_METADATA`` file at its top.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jft.errors import JftError

__all__ = [
    "ITEMS",
    "CheckpointError",
    "checkpoint_dir",
    "is_checkpoint_dir",
    "is_orbax_tree",
    "locate",
    "read_json",
    "resolve_step",
    "step_dirs",
    "step_folder",
]

ITEMS = ("state", "data_state", "config", "checksums")


class CheckpointError(JftError, ValueError):
    """A checkpoint cannot be restored or written; one line says which and why."""


def checkpoint_dir(path: str | os.PathLike) -> str:
    """The checkpoint directory of ``path``: ``<path>/checkpoints`` for a workdir, else ``path``."""
    path = os.path.abspath(os.fspath(path))
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def step_dirs(directory: str | os.PathLike) -> list[int]:
    """The finished steps of a checkpoint directory, increasing.

    orbax renames a step's folder to its bare number once every item is written,
    so a save cut off (``<step>.orbax-checkpoint-tmp-*``) is not among them.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


def is_orbax_tree(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bare orbax PyTree folder (a folder of variables)."""
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) or os.path.isfile(
        os.path.join(path, "_METADATA")
    )


def step_folder(path: str | os.PathLike) -> tuple[str, int] | None:
    """``(checkpoint directory, step)`` when ``path`` is one finished step's folder, else None."""
    path = os.path.abspath(os.fspath(path))
    name = os.path.basename(path)
    if not name.isdigit() or not os.path.isdir(os.path.join(path, "state")):
        return None
    return os.path.dirname(path), int(name)


def locate(path: str | os.PathLike) -> tuple[str, str, int | None] | None:
    """What ``path`` is, by the one rule jft uses everywhere.

    Returns:
      ``("run", checkpoint_directory, None)`` for a workdir or checkpoint directory
      with a finished step, ``("step", checkpoint_directory, step)`` for a step's
      folder, ``("tree", path, None)`` for an orbax folder of variables, or None.
    """
    if path is None or not os.path.isdir(os.fspath(path)):
        return None
    root = os.path.abspath(os.fspath(path))
    directory = checkpoint_dir(root)
    if step_dirs(directory):
        return "run", directory, None
    at_step = step_folder(root)
    if at_step is not None:
        return "step", *at_step
    if is_orbax_tree(root):
        return "tree", root, None
    return None


def is_checkpoint_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a run's workdir or checkpoint directory with a finished step,
    one step's folder, or an orbax folder of variables (``jft export``)."""
    return path is not None and locate(path) is not None


def resolve_step(directory: str, step: int | None) -> int:
    """``step`` (the latest when None), checked to be a finished step of ``directory``."""
    steps = step_dirs(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint in it")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise CheckpointError(
            f"checkpoint {directory} has no step {step} (it has {', '.join(map(str, steps))})"
        )
    return int(step)


def read_json(path: str) -> Any:
    """The JSON at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
