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
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or its sharded index).

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

import io
import json
import math
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jft.weights.restore import WeightsError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
H5_SUFFIXES = (".h5", ".hdf5", ".keras")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz", *H5_SUFFIXES)

# Wrappers of a state dict in training checkpoints, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")

_SAFETENSORS_DTYPES = {
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


def _fail(path: str | os.PathLike, problem: str) -> WeightsError:
    # One line, whatever the underlying library said.
    problem = " ".join(str(problem).split())
    if len(problem) > 300:
        problem = problem[:297] + "..."
    return WeightsError(f"{os.fspath(path)}: {problem}")


def _read_orbax_variables(path: str) -> dict[str, np.ndarray]:
    from flax import traverse_util

    from jft.weights.convert import load_checkpoint

    variables = load_checkpoint(path)
    flat = traverse_util.flatten_dict(variables, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns the arrays of the weights file or model folder at ``path``, by name.

    Args:
      path: a ``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``, ``.npz``, Keras
        ``.h5``/``.weights.h5``/``.keras`` file, a Hugging Face model folder, or an
        orbax folder of variables (:func:`jft.train.export`,
        :func:`jft.weights.convert`), whose names are jft paths (``params/...``).

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
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        return _read_orbax_variables(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.exists(path):
        raise _fail(path, "no such file or folder")
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
    raise _fail(
        path,
        f"unknown extension {ext}; jft reads {', '.join(SUFFIXES)} files and Hugging Face folders",
    )


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
            raise _fail(path, "not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise _fail(
                path,
                f"not a safetensors file, or truncated: its header claims {n} bytes "
                f"but the file has {size}",
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(path, f"not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (its header is not a JSON object)")
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
        return _fail(path, f"corrupt header: tensor {name!r} {problem}; the file is damaged")

    if not isinstance(info, dict):
        raise bad(f"has a bad entry {info!r} (expected dtype, shape and data_offsets)")
    dtype_name = info.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise bad(f"has dtype {info.get('dtype')!r}; known: {', '.join(_SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r} (expected a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r} (expected [begin, end])")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"has offsets [{begin}, {end}] (expected 0 <= begin <= end)")
    if end > data_size:
        raise _fail(
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
        raise _fail(
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
            raise _fail(
                path,
                f"refused to load: the pickle holds Python objects other than tensors"
                f"{culprit}, and jft never runs pickled code; save the weights with "
                "safetensors (safetensors.torch.save_file(model.state_dict(), "
                "'model.safetensors')) and read that",
            ) from None
        raise _fail(path, f"not a PyTorch weights file ({_first_line(msg)})") from None
    except Exception as e:  # torch raises many types for a file that is not its own
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        what = "truncated or corrupt PyTorch file" if is_zip else "not a PyTorch weights file"
        raise _fail(path, f"{what} ({_first_line(str(e))})") from None

    flat = dict(_flatten_torch(_unwrap(obj)))
    if not flat:
        raise _fail(path, "not a weights file: it holds no tensors")
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
            raise _fail(
                path,
                f"corrupt: storage {key} ({numel} x {str(dtype).removeprefix('torch.')}) needs "
                f"{nbytes} bytes but the file holds {held or 0} for it; the file is damaged",
            )


def _unsafe_global(msg: str) -> str:
    # torch names the refused global: "Unsupported global: GLOBAL posix.system was not ..."
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return f" (it calls {m[1]})" if m else ""


def _first_line(msg: str) -> str:
    lines = [s.strip() for s in msg.strip().splitlines() if s.strip()]
    return lines[0] if lines else "unknown error"


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


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.npz`` file (``allow_pickle=False``)."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            raise _fail(path, "not an npz file (not a zip archive)")
    try:
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise _fail(
                path, "refused to load: the npz holds pickled objects, not plain arrays"
            ) from None
        raise _fail(path, f"not an npz file ({_first_line(str(e))})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _fail(path, f"truncated or not an npz file ({_first_line(str(e))})") from None


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
                raise _fail(
                    path,
                    f"corrupt: array {name!r} declares shape {shape} {dtype} ({nbytes} bytes) "
                    f"but the file holds {stored}; the file is damaged",
                )


def read_keras(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads Keras weights: ``.weights.h5`` (Keras 3), legacy ``.h5``, or ``.keras``.

    Names are ``<layer>/<weight>``: legacy files (Keras 2 ``save_weights``, any
    ``model.save("x.h5")``) name each weight (``block1_conv1/kernel``). Keras 3
    ``.weights.h5`` files store ``layers/<layer>/vars/<i>`` with automatic layer
    names (``conv2d_3``, ``dense_1``, by class and order) and unnamed variables;
    jft names them by their shapes, as Keras creates them: ``kernel, bias`` (a
    kernel alone) for Dense/Conv, ``gamma, beta`` for LayerNormalization,
    ``gamma, beta, moving_mean, moving_variance`` for BatchNormalization, and the
    index otherwise. Optimizer variables are dropped.
    """
    import h5py

    try:
        if str(path).lower().endswith(".keras"):
            with zipfile.ZipFile(path) as z:
                data = z.read("model.weights.h5")
            f = h5py.File(io.BytesIO(data), "r")
        else:
            f = h5py.File(path, "r")
    except KeyError:
        raise _fail(path, "not a Keras .keras archive (no model.weights.h5 inside)") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise _fail(path, f"truncated or not an HDF5 file ({_first_line(str(e))})") from None
    try:
        with f:
            if "model_weights" in f:
                out = _read_legacy_h5(f["model_weights"])
            elif "layer_names" in f.attrs:
                out = _read_legacy_h5(f)
            elif "layers" in f or "vars" in f:
                out = _read_keras3_h5(f)
            else:
                raise _fail(
                    path, "an HDF5 file, but not Keras weights (no layers or model_weights)"
                )
    except _H5Error as e:
        raise _fail(path, str(e)) from None
    except KeyError as e:
        missing = _first_line(str(e))
        raise _fail(path, f"corrupt Keras file: {missing} is listed but missing") from None
    except OSError as e:
        raise _fail(path, f"truncated or corrupt HDF5 file ({_first_line(str(e))})") from None
    if not out:
        raise _fail(path, "not a weights file: it holds no arrays")
    return out


def _str(x: Any) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _read_legacy_h5(group: Any) -> dict[str, np.ndarray]:
    out = {}
    for layer in group.attrs["layer_names"]:
        g = _h5_get(group, _str(layer))
        for wn in g.attrs.get("weight_names", []):
            wn = _str(wn)
            name = wn[:-2] if wn.endswith(":0") else wn
            out[name] = _h5_array(g, wn)
    return out


def _h5_get(group: Any, key: str) -> Any:
    """``group[key]``, refusing a link to another file (HDF5 would open it)."""
    import h5py

    link = group.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        where = _h5_where(group, key)
        raise _H5Error(f"{where} is a link to {link.filename}, outside this file; refused")
    if link is None:
        raise _H5Error(f"{_h5_where(group, key)} is listed but missing; the file is damaged")
    return group[key]


def _h5_where(group: Any, key: str) -> str:
    return f"{group.name.strip('/')}/{key}".strip("/")


def _h5_array(group: Any, key: str) -> np.ndarray:
    """``group[key]`` as an array, after checking it is stored in this file, in full."""
    import h5py

    where = _h5_where(group, key)
    ds = _h5_get(group, key)
    if not isinstance(ds, h5py.Dataset):
        raise _H5Error(f"{where} is not an array")
    if ds.external or ds.is_virtual:
        raise _H5Error(f"{where} reads its data from a file outside this one; refused")
    stored = ds.id.get_storage_size()
    if ds.compression is None and stored < ds.nbytes:
        raise _H5Error(
            f"{where} declares shape {ds.shape} ({ds.nbytes} bytes) but stores {stored}; "
            "the file is damaged"
        )
    return np.asarray(ds)


class _H5Error(Exception):
    """A problem inside a Keras file, reported by read_keras with the file's name."""


def _keras3_var_names(shapes: list[tuple[int, ...]]) -> list[str]:
    ranks = [len(s) for s in shapes]
    if len(ranks) == 2 and ranks[0] >= 2 and ranks[1] == 1:
        return ["kernel", "bias"]
    if len(ranks) == 1 and ranks[0] >= 2:
        return ["kernel"]
    if ranks == [1, 1]:
        return ["gamma", "beta"]
    if ranks == [1, 1, 1, 1]:
        return ["gamma", "beta", "moving_mean", "moving_variance"]
    return [str(i) for i in range(len(shapes))]


def _read_keras3_h5(group: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key in group:
        if not prefix and key in ("optimizer", "metrics"):
            continue
        item = _h5_get(group, key)
        if key == "vars":
            idx = sorted(item, key=int)
            names = _keras3_var_names([tuple(_h5_get(item, i).shape) for i in idx])
            for i, n in zip(idx, names, strict=True):
                out[f"{prefix}{n}"] = _h5_array(item, i)
        elif key == "layers" and hasattr(item, "keys"):
            out.update(_read_keras3_h5(item, prefix))
        elif hasattr(item, "keys"):
            out.update(_read_keras3_h5(item, f"{prefix}{key}/"))
    return out


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
        raise _fail(
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
                raise _fail(p(index), f"not a shard index ({e})") from None
            out: dict[str, np.ndarray] = {}
            for shard in map(p, shards):  # every name is checked before any shard is read
                if not os.path.exists(shard):
                    raise _fail(shard, f"no such file (a shard listed in {index})")
            for shard in shards:
                out.update(reader(p(shard)))
            return out
    if os.path.exists(p("pytorch_model.bin")):
        return read_torch(p("pytorch_model.bin"))
    raise _fail(
        path,
        "a folder without model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin: not a Hugging Face model folder jft can read",
    )
