"""Write ``name -> array`` mappings as weights files, one tensor at a time.

The counterpart of :mod:`jft.weights.readers`. Every writer converts and writes
each tensor in turn (layout change, dtype cast, bytes out) and lets it go before
the next, so the memory a write adds is about twice the largest tensor, not the
model: the safetensors header is computed from the shapes first, then the bytes
follow. Each writer creates exactly the file it is given; callers write to a
temporary name and rename (see :func:`jft.weights.export`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jft.weights.safetensors_file import SAFETENSORS_DTYPES

__all__ = [
    "DTYPES",
    "cast",
    "nbytes",
    "out_dtype",
    "parse_size",
    "shards",
    "write_hf_safetensors",
    "write_keras_h5",
    "write_npz",
    "write_safetensors",
    "write_torch",
]

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def cast(value: Any, dtype: np.dtype | None) -> np.ndarray:
    """``value`` as a C-contiguous array; floating arrays in ``dtype`` when given."""
    value = np.asarray(value)
    if dtype is not None and _is_float(value.dtype) and value.dtype != dtype:
        value = value.astype(dtype)
    return np.ascontiguousarray(value)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def out_dtype(value: Any, dtype: np.dtype | None) -> np.dtype:
    """The dtype ``value`` is written in: ``dtype`` for floating arrays, else its own."""
    own = np.dtype(value.dtype)
    return dtype if dtype is not None and _is_float(own) else own


def nbytes(value: Any, dtype: np.dtype | None) -> int:
    """Bytes ``value`` takes once cast to ``dtype`` (without casting it)."""
    out = out_dtype(value, dtype)
    return int(np.prod(np.shape(value), dtype=np.int64)) * out.itemsize


def write_safetensors(
    path: str,
    tensors: Mapping[str, Any],
    dtype: np.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` to a ``.safetensors`` file, streaming them in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in tensors.items():
        size = nbytes(value, dtype)
        header[name] = {
            "dtype": _CODES[out_dtype(value, dtype)],
            "shape": [int(d) for d in np.shape(value)],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for value in tensors.values():
            f.write(memoryview(cast(value, dtype).reshape(-1).view(np.uint8)))


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"20KB"``, ``"1.5GiB"`` or a number of bytes -> bytes (HF's units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if m is None:
        raise ValueError(f"not a size: {size!r} (e.g. 5GB, 200MB, 20KB or a number of bytes)")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get(unit)
    if scale is None:
        scale = 2 ** (10 * ("KMGT".index(unit[0]) + 1))
    return int(float(m[1]) * scale)


def shards(
    tensors: Mapping[str, Any], max_bytes: int, dtype: np.dtype | None = None
) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor: alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        n = nbytes(value, dtype)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return [g for g in groups if g]


def write_hf_safetensors(
    folder: str,
    tensors: Mapping[str, Any],
    max_bytes: int,
    dtype: np.dtype | None = None,
) -> list[str]:
    """``model.safetensors``, or shards and ``model.safetensors.index.json`` above ``max_bytes``.

    Returns the file names written.
    """
    metadata = {"format": "pt"}  # transformers reads only files that say so
    groups = shards(tensors, max_bytes, dtype)
    if len(groups) <= 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, dtype, metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(
            os.path.join(folder, name), {k: tensors[k] for k in group}, dtype, metadata
        )
        weight_map.update(dict.fromkeys(group, name))
        names.append(name)
    total = sum(nbytes(v, dtype) for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, "model.safetensors.index.json"]


def write_npz(path: str, tensors: Mapping[str, Any], dtype: np.dtype | None = None) -> None:
    """A NumPy ``.npz`` archive (bfloat16 is not a NumPy file dtype: use float16/32)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, value in tensors.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, cast(value, dtype), allow_pickle=False)


def write_torch(path: str, tensors: Mapping[str, Any], dtype: np.dtype | None = None) -> None:
    """A PyTorch ``.pth`` state dict (``torch.save``; needs torch, holds the model in memory)."""
    import torch

    state = {}
    for name, value in tensors.items():
        value = cast(value, dtype)
        if not value.flags.writeable:  # a view of a memory-mapped file: torch wants its own
            value = value.copy()
        if value.dtype == np.dtype(ml_dtypes.bfloat16):
            state[name] = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(value)
    torch.save(state, path)


def write_keras_h5(path: str, tensors: Mapping[str, Any], dtype: np.dtype | None = None) -> None:
    """A legacy Keras ``.h5`` weights file: ``layer/weight`` names, layers in order.

    ``model.load_weights(path)`` (layers in the same order) and
    ``model.load_weights(path, by_name=True)`` (by layer name) both read it.
    """
    import h5py

    layers: dict[str, list[str]] = {}
    for name in tensors:
        layer, _, _ = name.rpartition("/")
        layers.setdefault(layer, []).append(name)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        f.attrs["backend"] = b"jax"
        f.attrs["keras_version"] = b"3"
        for layer, names in layers.items():
            g = f.create_group(layer)
            g.attrs["weight_names"] = [f"{n}:0".encode() for n in names]
            for n in names:
                g.create_dataset(f"{n}:0", data=cast(tensors[n], dtype))
