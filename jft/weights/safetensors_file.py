"""Read a ``.safetensors`` file as memory-mapped arrays, every header field checked first."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from jft.weights.errors import WeightsError, fail

__all__ = ["SAFETENSORS_DTYPES", "read_safetensors"]

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


# The safetensors format caps its JSON header at 100 MB.
_MAX_HEADER = 100_000_000


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file as memory-mapped arrays (no copy).

    Every header field is checked against the file before a byte of data is
    viewed: the header length, each tensor's dtype, its shape (non-negative
    integers), and its offsets (``0 <= begin <= end <=`` the data size, and
    ``end - begin`` equal to the shape's size times the item size, computed
    without overflow).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(path, "not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise fail(
                path,
                f"not a safetensors file, or truncated: its header claims {n} bytes "
                f"but the file has {size}",
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail(path, f"not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise fail(path, "not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    entries = {k: _safetensors_entry(path, k, info, data_size) for k, info in header.items()}
    buf = np.memmap(path, dtype=np.uint8, mode="r") if data_size > 0 else np.zeros(0, np.uint8)
    return {
        name: buf[data_start + begin : data_start + end].view(dtype).reshape(shape)
        for name, (dtype, shape, begin, end) in entries.items()
    }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _safetensors_entry(
    path: str | os.PathLike, name: str, info: Any, data_size: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One header entry, checked: ``(dtype, shape, begin, end)`` or a WeightsError."""

    def bad(problem: str) -> WeightsError:
        return fail(path, f"corrupt header: tensor {name!r} {problem}; the file is damaged")

    if not isinstance(info, dict):
        raise bad(f"has a bad entry {info!r} (expected dtype, shape and data_offsets)")
    dtype_name = info.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise bad(f"has dtype {info.get('dtype')!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r} (expected a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r} (expected [begin, end])")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"has offsets [{begin}, {end}] (expected 0 <= begin <= end)")
    if end > data_size:
        raise fail(
            path,
            f"truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section",
        )
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        raise bad(
            f"of shape {shape} {info['dtype']} needs {nbytes} bytes but its offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return dtype, tuple(shape), begin, end
