"""Layout conversions shared by the key maps (PyTorch -> Flax)."""

from __future__ import annotations

import numpy as np


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``(O, I, H, W)`` -> Flax kernel ``(H, W, I, O)`` (a view)."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight ``(out, in)`` -> Flax kernel ``(in, out)``; a 1×1 conv too."""
    if w.ndim == 4:
        w = w.reshape(w.shape[0], w.shape[1])
    return w.T
