"""Convert a weights file to a Flax checkpoint (an orbax folder of variables), and load one back."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jft.checkpoint import save_variables
from jft.weights.readers import read, read_checkpoint
from jft.weights.restore import (
    RestoreReport,
    WeightsError,
    check_finite,
    check_layout,
    infer_arch,
    keymap,
    restore,
)

__all__ = ["check_destination", "convert", "infer_arch", "load_checkpoint", "save_checkpoint"]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    arch: str | None = None,
    model: str | nn.Module | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    example_input: Any = None,
    skip: Sequence[str] = (),
    strict: bool = True,
) -> RestoreReport:
    """Writes the weights at ``src`` as a Flax variables checkpoint at ``dst``.

    Without ``model`` the checkpoint holds what the key map makes of the file
    (``{"params": ..., "batch_stats": ...}`` in jft paths), unchecked. With a
    ``model`` (a :func:`jft.models.get` name or a module) the variables are
    initialized on ``example_input`` and filled with :func:`jft.weights.restore`,
    so shapes are checked and ``skip``/``strict`` apply; the checkpoint then holds
    every variable of the model.

    Args:
      src: a weights file or folder that :func:`jft.weights.read` takes.
      dst: the checkpoint folder to create; it must not exist.
      arch: the key map (``"resnet"``, ``"vgg"``...); inferred from the names in
        the file when None.
      model: the model to fill, by name or as a module.
      model_kwargs: arguments of ``jft.models.get(model, **model_kwargs)``.
      example_input: the input to initialize the model with; default a
        ``(1, 224, 224, 3)`` float32 image (a Keras VGG needs its own input size).
      skip: regexes of variables to keep from init (a new head), as in ``restore``.
      strict: as in ``restore``.

    Returns:
      The :class:`jft.weights.RestoreReport`.

    Raises:
      WeightsError: ``dst`` exists or cannot be written (checked before anything
        is read), ``arch`` is unknown, or the file does not fit or holds NaN/Inf
        (one line).
    """
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst)
    if arch:
        keymap(arch)  # an unknown arch fails before the file is read
    flat = read(src)
    arch = arch or infer_arch(flat)
    if model is None:
        check_layout(flat, arch, os.fspath(src))
        mapped, unused = keymap(arch)(flat)
        if not mapped:
            raise WeightsError(f"{os.fspath(src)}: no array fits arch={arch!r}; is arch right?")
        check_finite(mapped, flat, os.fspath(src))
        variables = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in mapped.items()}, "/")
        report = RestoreReport(tuple(sorted(mapped)), (), tuple(sorted(unused)))
    else:
        if isinstance(model, str):
            from jft import models

            model = models.get(model, **dict(model_kwargs or {}))
        x = jnp.zeros((1, 224, 224, 3)) if example_input is None else example_input
        init = jax.jit(model.init)(jax.random.key(0), x)
        variables, report = restore(
            init, flat, arch, skip=skip, strict=strict, source=os.fspath(src)
        )
    save_checkpoint(dst, variables)
    return report


def check_destination(path: str | os.PathLike) -> None:
    """Raises a WeightsError unless a checkpoint folder can be created at ``path``.

    Checked by creating and removing a file in the nearest existing folder above
    ``path``, so a read-only file system or a missing permission fails here, at
    once, instead of inside orbax's writer threads (which wait minutes).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise WeightsError(f"{path}: already exists; jft does not overwrite checkpoints")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WeightsError(f"{path}: cannot be created, {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jft-write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WeightsError(
            f"{path}: cannot write in {parent} ({e.strerror or e}); choose a writable destination"
        ) from None


def save_checkpoint(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes ``variables`` (a pytree of arrays) with orbax; ``path`` must not exist."""
    path = os.path.abspath(os.fspath(path))
    check_destination(path)
    save_variables(path, variables)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the variables of an orbax folder of variables (:func:`convert`,
    :func:`save_checkpoint`), a run or one of its steps, as nested dicts of arrays
    (``{"params": ..., "batch_stats": ...}``); see :func:`jft.weights.read`.
    """
    return traverse_util.unflatten_dict(read_checkpoint(path), sep="/")
