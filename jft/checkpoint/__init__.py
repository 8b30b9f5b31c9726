"""Checkpoints on orbax: a run's steps (save, keep, restore exactly, fall back past damage),
their checksums, their metadata, and the model variables in any orbax folder.

Below :mod:`jft.weights` and :mod:`jft.train`, which both read through it.
"""

from jft.checkpoint.layout import (
    ITEMS,
    CheckpointError,
    checkpoint_dir,
    is_checkpoint_dir,
    locate,
    step_dirs,
)
from jft.checkpoint.manager import Checkpointer, Restored
from jft.checkpoint.metadata import CheckpointMetadata, read_config, read_metadata
from jft.checkpoint.variables import read_variables, save_variables

__all__ = [
    "ITEMS",
    "CheckpointError",
    "CheckpointMetadata",
    "Checkpointer",
    "Restored",
    "checkpoint_dir",
    "is_checkpoint_dir",
    "locate",
    "read_config",
    "read_metadata",
    "read_variables",
    "save_variables",
    "step_dirs",
]
