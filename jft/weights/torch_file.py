"""Read a PyTorch weights file with torch's safe unpickler; no pickled code ever runs.

``torch.load(weights_only=True, mmap=True)``: only tensors and plain containers,
the tensors views of the memory-mapped file. Common wrappers (``{"state_dict":
...}``, ``{"model": ...}``, a ``module.`` prefix from ``DataParallel``) are
unwrapped and nested dicts are flattened with ``.``; non-tensor entries (an
epoch number) are dropped. Each storage's size is checked against its zip
record before torch reads it.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jft.weights.errors import fail, first_line

__all__ = ["TORCH_SUFFIXES", "read_torch"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Wrappers of a state dict in training checkpoints, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch file with ``torch.load(weights_only=True, mmap=True)``.

    Raises:
      WeightsError: PyTorch is not installed, the file holds pickled objects
        other than tensors (they are refused, never run), or it is not a PyTorch
        file.
    """
    try:
        import torch
    except ImportError:
        raise fail(
            path,
            "reading PyTorch files needs the torch package (pip install torch), "
            "or convert the file to .safetensors",
        ) from None
    import pickle

    def load(mmap: bool) -> Any:
        with warnings.catch_warnings():
            # torch warns about pickle protocols its safe unpickler may not know.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    _check_torch_records(path)
    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load(mmap=False)  # the legacy (non-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg:
            culprit = _unsafe_global(msg)
            raise fail(
                path,
                f"refused to load: the pickle holds Python objects other than tensors"
                f"{culprit}, and jft never runs pickled code; save the weights with "
                "safetensors (safetensors.torch.save_file(model.state_dict(), "
                "'model.safetensors')) and read that",
            ) from None
        raise fail(path, f"not a PyTorch weights file ({first_line(msg)})") from None
    except Exception as e:  # torch raises many types for a file that is not its own
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        what = "truncated or corrupt PyTorch file" if is_zip else "not a PyTorch weights file"
        raise fail(path, f"{what} ({first_line(str(e))})") from None

    flat = dict(_flatten_torch(_unwrap(obj)))
    if not flat:
        raise fail(path, "not a weights file: it holds no tensors")
    if all(k.startswith("module.") for k in flat):
        flat = {k[len("module.") :]: v for k, v in flat.items()}
    return flat


class _Inert:
    """Whatever the pickle builds: takes any call, item or state, and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        del state

    def __setitem__(self, key: Any, value: Any) -> None:
        del key, value

    def append(self, value: Any) -> None:
        del value

    def extend(self, values: Any) -> None:
        del values


def _check_torch_records(path: str | os.PathLike) -> None:
    """Checks each storage's size in a zip-format PyTorch file against its record.

    ``torch.load(mmap=True)`` does not: a storage that claims more bytes than its
    record holds is read from whatever follows it in the file. The pickle is
    walked with an unpickler that imports nothing (every global is inert), so
    this runs no pickled code either.
    """
    import pickle

    import torch

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # the legacy format: torch.load reads it without mmap, checking sizes
    with z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            return  # not a torch archive: torch.load says so
        prefix = pkl[: -len("data.pkl")]
        records = {n[len(prefix) + len("data/") :]: z.getinfo(n).file_size for n in names}
        storages: list[tuple[Any, ...]] = []

        class Scan(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return name if module == "torch" and name.endswith("Storage") else _Inert

            def persistent_load(self, pid: Any) -> Any:
                storages.append(tuple(pid))
                return _Inert()

        try:
            Scan(io.BytesIO(z.read(pkl))).load()
        except Exception:  # a pickle this scan cannot walk: torch.load judges it
            return
    for pid in storages:
        if len(pid) != 5 or pid[0] != "storage":
            continue
        _, kind, key, _, numel = pid
        with warnings.catch_warnings():  # torch.FloatStorage.dtype warns that it is legacy
            warnings.simplefilter("ignore", UserWarning)
            dtype = getattr(getattr(torch, str(kind), None), "dtype", torch.uint8)
        if kind == "UntypedStorage":
            dtype = torch.uint8
        if not isinstance(numel, int) or isinstance(numel, bool):
            continue  # not a storage torch would read: torch.load judges it
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        held = records.get(str(key))
        if held is None or held < nbytes:
            raise fail(
                path,
                f"corrupt: storage {key} ({numel} x {str(dtype).removeprefix('torch.')}) needs "
                f"{nbytes} bytes but the file holds {held or 0} for it; the file is damaged",
            )


def _unsafe_global(msg: str) -> str:
    # torch names the refused global: "Unsupported global: GLOBAL posix.system was not ..."
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return f" (it calls {m[1]})" if m else ""


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _flatten_torch(obj: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), _torch_to_numpy(obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten_torch(v, f"{prefix}{k}.")
    elif isinstance(obj, list | tuple) and any(isinstance(v, torch.Tensor) for v in obj):
        for i, v in enumerate(obj):
            yield from _flatten_torch(v, f"{prefix}{i}.")


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    # NumPy has no bfloat16/float8: reinterpret the bits as ml_dtypes (no copy).
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in special:
        as_int, np_dtype = special[t.dtype]
        return t.view(as_int).numpy().view(np_dtype)
    return t.numpy()
