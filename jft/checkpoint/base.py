"""The frozen base of an adapter-only (LoRA) checkpoint: named by its path and a hash.

A LoRA run trains adapters on a frozen base that it loaded from ``init.path``;
storing that base at every step would cost the whole model each time. Such a
step leaves ``state.frozen`` out and stores, in its ``base`` item, the base's
path and ``path -> [checksum, shape, dtype]`` of each frozen array, so that a
restore can check that it is given the same base, and a model-free reader can
fill the base in from its path and check every array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jft.checkpoint import checksums as sums_lib
from jft.checkpoint.layout import CheckpointError

__all__ = ["ITEM", "describe", "mismatch", "without_base"]

ITEM = "base"


def describe(path: str, frozen: Any) -> dict[str, Any]:
    """The ``base`` item of an adapter-only step: ``{"path", "hash", "arrays"}``."""
    sums = sums_lib.checksums(frozen)
    arrays = {
        p: [sums[p], list(np.shape(x)), np.dtype(x.dtype).name]
        for p, x in sums_lib.flat_with_paths(frozen).items()
    }
    return {"path": path, "hash": f"{sums_lib.json_checksum(arrays):08x}", "arrays": arrays}


def mismatch(directory: str, step: int, stored: dict[str, Any], ours: dict[str, Any]) -> str:
    """The one line for an adapter-only step restored onto another base, naming both."""
    return (
        f"checkpoint {directory} step {step} holds adapters trained on the base "
        f"{stored.get('path') or '(a random init)'} (params hash {stored.get('hash')}), "
        f"but this run's base is {ours.get('path') or '(a random init)'} (params hash "
        f"{ours['hash']}): set init.path to the checkpoint's base, or use a new --workdir"
    )


def without_base(target_state: Any, stored: dict[str, Any] | None, ckpt: Any, step: int) -> Any:
    """The target of an adapter-only step: ``target_state`` without its frozen base,
    after checking that base is the one the step was trained on.

    Args:
      target_state: the state to restore onto; its ``frozen`` holds the base's arrays.
      stored: the step's ``base`` item; None for a step that holds the whole state,
        which is then restored onto ``target_state`` as it is.
      ckpt: the :class:`jft.checkpoint.Checkpointer` (its directory and ``frozen_base``).
      step: the step, for messages.

    Raises:
      CheckpointError: the target has no concrete base, or another one.
    """
    if stored is None:
        return target_state
    frozen = getattr(target_state, "frozen", None)
    if frozen is None or any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
        raise CheckpointError(
            f"checkpoint {ckpt.directory} step {step} holds adapters only: restore it onto "
            "a state whose frozen base holds the base's arrays"
        )
    ours = describe(ckpt.frozen_base or "", frozen)
    if ours["hash"] != stored.get("hash"):
        raise CheckpointError(mismatch(ckpt.directory, step, stored, ours))
    return target_state.replace(frozen={})
