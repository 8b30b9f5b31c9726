"""Convert a weights file to a Flax checkpoint (orbax), and load one back."""

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

from jft.weights import keymaps
from jft.weights.readers import read
from jft.weights.restore import (
    RestoreReport,
    WeightsError,
    check_finite,
    check_layout,
    keymap,
    restore,
)


def infer_arch(flat: Mapping[str, np.ndarray]) -> str:
    """The registered key map that takes the most arrays of ``flat``.

    Raises:
      WeightsError: no key map takes any of them.
    """
    best, best_n = None, 0
    for arch in keymaps.names():
        try:
            mapped, _ = keymaps.get(arch)(flat)
        except Exception:  # a key map written for another layout may choke: skip it
            continue
        if len(mapped) > best_n:
            best, best_n = arch, len(mapped)
    if best is None:
        sample = ", ".join(list(flat)[:3])
        raise WeightsError(
            f"no key map recognizes these weights (e.g. {sample}); known archs: "
            f"{', '.join(keymaps.names())}"
        )
    return best


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
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    check_destination(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, dict(variables))
        ckptr.wait_until_finished()


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`convert` or :func:`save_checkpoint`.

    Returns:
      The variables, as a nested dict of arrays (``{"params": ..., "batch_stats": ...}``).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such checkpoint folder")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_one_device()), tree
        )
        return ckptr.restore(path, target)


def _one_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
