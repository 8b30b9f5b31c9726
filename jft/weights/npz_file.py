"""Read a ``.npz`` file without pickles, each member's header checked against its size."""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from jft.weights.errors import fail, first_line

__all__ = ["read_npz"]


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.npz`` file (``allow_pickle=False``)."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            raise fail(path, "not an npz file (not a zip archive)")
    try:
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise fail(
                path, "refused to load: the npz holds pickled objects, not plain arrays"
            ) from None
        raise fail(path, f"not an npz file ({first_line(str(e))})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise fail(path, f"truncated or not an npz file ({first_line(str(e))})") from None


def _check_npz_headers(path: str | os.PathLike) -> None:
    """Checks each member's .npy header against the member's size before NumPy reads it."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
                stored = info.file_size - f.tell()
            if dtype.hasobject:
                raise ValueError("pickle")  # reported as pickled objects, never loaded
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != stored:
                raise fail(
                    path,
                    f"corrupt: array {name!r} declares shape {shape} {dtype} ({nbytes} bytes) "
                    f"but the file holds {stored}; the file is damaged",
                )
