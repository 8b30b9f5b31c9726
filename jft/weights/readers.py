"""Read weights files into a flat ``name -> np.ndarray`` mapping, without running pickled code.

Formats, chosen by the path:

- ``.safetensors``: the header is parsed here and every tensor is a read-only
  ``np.memmap`` view of the file, so reading copies nothing (bfloat16 and float8
  come back as ``ml_dtypes`` arrays);
- ``.pt``, ``.pth``, ``.bin``, ``.ckpt``: ``torch.load(weights_only=True, mmap=True)``
  (PyTorch's safe unpickler: only tensors and plain containers; the tensors are
  views of the memory-mapped file). Common wrappers (``{"state_dict": ...}``,
  ``{"model": ...}``, a ``module.`` prefix from ``DataParallel``) are unwrapped and
  nested dicts are flattened with ``.``; non-tensor entries (an epoch number)
  are dropped;
- ``.npz``: ``np.load(allow_pickle=False)``;
- ``.h5``, ``.hdf5``, ``.keras``: Keras weights (see :func:`read_keras`);
- a folder: a Hugging Face model folder (``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index);
- a run's workdir or checkpoint directory, one of its step folders, or an orbax
  folder of variables (see :func:`read_checkpoint`): names are jft paths.

Every problem (a missing file, an unknown extension, a truncated file, a file
that holds no weights, pickled code) raises a one-line
:class:`jft.weights.WeightsError` that names the file.

Nothing in a file is trusted: every header field (safetensors offsets, shapes
and dtypes, the ``.npy`` headers inside an npz, HDF5 dataset sizes, PyTorch
storage sizes against their zip records) is checked against the file before
data is read, and nothing outside the file or
folder given is opened (a shard index naming ``../x``, a symlink out of the
folder, an HDF5 external link or external storage are refused). NaN and Inf
values are returned as they are, so that ``jft inspect`` can show a damaged
file; :func:`jft.weights.restore` (and so ``from_pretrained``, ``convert`` and
``init.path``) refuses them, naming the tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util

from jft import checkpoint
from jft.checkpoint import base as base_lib
from jft.weights import keymaps
from jft.weights.errors import fail
from jft.weights.keras_file import H5_SUFFIXES, read_keras
from jft.weights.npz_file import read_npz
from jft.weights.restore import infer_arch
from jft.weights.safetensors_file import read_safetensors
from jft.weights.torch_file import TORCH_SUFFIXES, read_torch

__all__ = [
    "H5_SUFFIXES",
    "SUFFIXES",
    "TORCH_SUFFIXES",
    "folder_file",
    "read",
    "read_checkpoint",
    "read_keras",
    "read_npz",
    "read_safetensors",
    "read_torch",
]

SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz", *H5_SUFFIXES)


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns the arrays of the weights file or model folder at ``path``, by name.

    Args:
      path: a ``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``, ``.npz``, Keras
        ``.h5``/``.weights.h5``/``.keras`` file, a Hugging Face model folder, a
        run's workdir or checkpoint directory (its latest good step), one step's
        folder, or an orbax folder of variables (:func:`jft.train.export`,
        :func:`jft.weights.convert`); jft's own folders give jft paths
        (``params/...``, ``batch_stats/...``).

    Returns:
      A dict from the names in the file (``layer1.0.conv1.weight``,
      ``block1_conv1/kernel``) to NumPy arrays in the file's own layout; key maps
      (:mod:`jft.weights.keymaps`) turn them into jft variables. Arrays may be
      read-only views of the memory-mapped file.

    Raises:
      WeightsError: one line naming the file and the problem.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> np.savez(path, **{"fc.weight": np.ones((2, 3), np.float32)})
    >>> {k: v.shape for k, v in read(path).items()}
    {'fc.weight': (2, 3)}
    """
    path = os.fspath(path)
    if checkpoint.locate(path) is not None:
        return read_checkpoint(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.exists(path):
        raise fail(path, "no such file or folder")
    name = os.path.basename(path).lower()
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith(TORCH_SUFFIXES):
        return read_torch(path)
    if name.endswith(".npz"):
        return read_npz(path)
    if name.endswith(H5_SUFFIXES):
        return read_keras(path)
    ext = os.path.splitext(name)[1] or "(none)"
    raise fail(
        path,
        f"unknown extension {ext}; jft reads {', '.join(SUFFIXES)} files and Hugging Face folders",
    )


def folder_file(folder: str | os.PathLike, name: str) -> str:
    """``folder/name``, refusing a name or a symlink that leads outside ``folder``.

    A shard index or a symlink could otherwise make jft open any file
    (``../../etc/hostname``). One exception, for the Hugging Face hub cache: a
    file of ``snapshots/<revision>/`` may link into the repository's ``blobs/``.

    Raises:
      WeightsError: ``name`` resolves outside ``folder``.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    roots = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    real = os.path.realpath(path)
    if os.path.isabs(name) or not any(os.path.commonpath([real, r]) == r for r in roots):
        raise fail(
            path,
            f"refused: {name!r} leads outside the folder {folder} (to {real}); "
            "jft reads only files inside the folder it is given",
        )
    return path


def _read_hf_folder(path: str) -> dict[str, np.ndarray]:
    def p(name: str) -> str:
        return folder_file(path, name)

    if os.path.exists(p("model.safetensors")):
        return read_safetensors(p("model.safetensors"))
    for index, reader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", read_torch),
    ):
        if os.path.exists(p(index)):
            try:
                with open(p(index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                if not all(isinstance(s, str) for s in shards):
                    raise TypeError("a shard name is not a string")
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors too
                raise fail(p(index), f"not a shard index ({e})") from None
            out: dict[str, np.ndarray] = {}
            for shard in map(p, shards):  # every name is checked before any shard is read
                if not os.path.exists(shard):
                    raise fail(shard, f"no such file (a shard listed in {index})")
            for shard in shards:
                out.update(reader(p(shard)))
            return out
    if os.path.exists(p("pytorch_model.bin")):
        return read_torch(p("pytorch_model.bin"))
    raise fail(
        path,
        "a folder without model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin: not a Hugging Face model folder jft can read",
    )


def read_checkpoint(path: str | os.PathLike, *, step: int | None = None) -> dict[str, np.ndarray]:
    """The model variables of a jft checkpoint, flat: ``params/backbone/conv1/kernel`` -> array.

    Args:
      path: a run's workdir or checkpoint directory (its latest good step, or
        ``step``; trainable and frozen parameters are merged back into
        ``params/``, BatchNorm statistics are under ``batch_stats/``), one step's
        folder, or an orbax folder of variables (:func:`jft.train.export`,
        :func:`jft.weights.save_checkpoint`).
      step: the step of a run to read.

    Raises:
      CheckpointError: no step can be read, or an adapter-only step's base is
        missing or differs from the one it was trained on (one line).
    """
    variables, base = checkpoint.read_variables(path, step=step)
    flat = traverse_util.flatten_dict(variables, sep="/")
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if base is not None:
        flat.update(_base_arrays(os.fspath(path), base))
    return flat


def _quantized_in(base: dict[str, Any], path: str) -> bool:
    """Whether ``path`` is a kernel (or its scales) that a QLoRA run stored quantized."""
    module, _, leaf = path.rpartition("/")
    return leaf in ("kernel", "kernel_scale") and f"{module}/kernel_scale" in base["arrays"]


def _quantize(kernel: Any, dtype: str) -> dict[str, Any]:
    from jft.peft.quant import quantize  # jft.peft reads weights: imported when needed

    return quantize(kernel, "int8" if dtype == "int8" else "nf4")


def _base_arrays(path: str, base: dict[str, Any]) -> dict[str, np.ndarray]:
    # Read from the base's path, named by jft paths, each array checked against
    # the checksum the run stored for it.
    source = base.get("path") or ""
    where = f"checkpoint {path} holds adapters only and its base {source or '(a random init)'}"
    if not source or not os.path.exists(source):
        raise checkpoint.CheckpointError(
            f"{where} is not there: read it on a machine that has the base, or export the run "
            "there (jft export) to carry the whole model"
        )
    flat = read(source)
    if checkpoint.locate(source) is None:
        flat, _ = keymaps.get(infer_arch(flat))(flat)
    frozen = {}
    quantized: dict[str, dict[str, Any]] = {}  # module -> its codes and scales
    for p, (_, shape, dtype) in base["arrays"].items():
        value = flat.get(f"params/{p.removesuffix('_scale')}")
        if value is not None and _quantized_in(base, p):  # a QLoRA base: quantized as trained
            module, _, leaf = p.rpartition("/")
            if module not in quantized:
                quantized[module] = _quantize(value, base["arrays"][f"{module}/kernel"][2])
            value = quantized[module][leaf]
        if value is None or tuple(np.shape(value)) != tuple(shape):
            frozen = None
            break
        frozen[p] = np.asarray(value, dtype=dtype)
    tree = traverse_util.unflatten_dict(frozen, sep="/") if frozen is not None else None
    if tree is None or base_lib.describe(source, tree)["hash"] != base["hash"]:
        raise checkpoint.CheckpointError(
            f"{where} differs from the base it was trained on (params hash {base['hash']}): "
            "put the original base back at that path"
        )
    return {f"params/{p}": v for p, v in frozen.items()}
