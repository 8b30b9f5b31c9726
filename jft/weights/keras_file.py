"""Read Keras weights (``.weights.h5``, legacy ``.h5``, ``.keras``), refusing outside links."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import numpy as np

from jft.weights.errors import fail, first_line

__all__ = ["H5_SUFFIXES", "read_keras"]

H5_SUFFIXES = (".h5", ".hdf5", ".keras")


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
        raise fail(path, "not a Keras .keras archive (no model.weights.h5 inside)") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise fail(path, f"truncated or not an HDF5 file ({first_line(str(e))})") from None
    try:
        with f:
            if "model_weights" in f:
                out = _read_legacy_h5(f["model_weights"])
            elif "layer_names" in f.attrs:
                out = _read_legacy_h5(f)
            elif "layers" in f or "vars" in f:
                out = _read_keras3_h5(f)
            else:
                raise fail(path, "an HDF5 file, but not Keras weights (no layers or model_weights)")
    except _H5Error as e:
        raise fail(path, str(e)) from None
    except KeyError as e:
        missing = first_line(str(e))
        raise fail(path, f"corrupt Keras file: {missing} is listed but missing") from None
    except OSError as e:
        raise fail(path, f"truncated or corrupt HDF5 file ({first_line(str(e))})") from None
    if not out:
        raise fail(path, "not a weights file: it holds no arrays")
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
