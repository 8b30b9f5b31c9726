"""Export a run's parameters alone (no optimizer state), for inference and sharing."""

from __future__ import annotations

import os

import numpy as np
from flax import traverse_util

from jft.train.checkpoint import CheckpointError, read_params


def export(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None) -> str:
    """Writes the model variables of a checkpoint to ``dst``; the format follows its name.

    - ``*.safetensors``: one file, arrays named by their jft paths
      (``params/backbone/conv1/kernel``, ``batch_stats/backbone/bn1/mean``);
    - ``*.npz``: the same names in a NumPy archive;
    - anything else: an orbax folder of ``{"params": ..., "batch_stats": ...}``
      (:func:`jft.weights.save_checkpoint`).

    Read it back with ``jft.weights.read(dst)`` (files) or
    ``jft.weights.load_checkpoint(dst)`` (folders), and fill a model with
    ``jft.weights.restore(variables, flat, arch="jft")``. BatchNorm statistics
    are included: inference needs them.

    Args:
      src: a run's workdir or checkpoint directory (the latest good step is used).
      dst: the file or folder to create; it must not exist.
      step: the step to export instead of the latest.

    Returns:
      The absolute path written.

    Raises:
      CheckpointError: ``dst`` exists, or no step of ``src`` can be read (one line).
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: already exists; jft.train.export does not overwrite")
    flat = {k: np.ascontiguousarray(v) for k, v in read_params(src, step=step).items()}
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    name = dst.lower()
    if name.endswith((".safetensors", ".npz")):
        # Write beside it and rename: a reader never sees half a file.
        tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp{os.getpid()}")
        try:
            if name.endswith(".safetensors"):
                from safetensors.numpy import save_file

                save_file(flat, tmp, metadata={"format": "jft"})
            else:
                with open(tmp, "wb") as f:
                    np.savez(f, **flat)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        from jft.weights import save_checkpoint

        save_checkpoint(dst, traverse_util.unflatten_dict(flat, sep="/"))
    return dst
