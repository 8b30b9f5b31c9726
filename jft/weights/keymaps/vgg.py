"""``vgg`` key map: torchvision, timm and Keras VGG names -> jft paths.

Accepted layouts (detected from the names):

- torchvision: ``features.{n}.weight`` (3×3 convs; the block of each conv is
  read from the gaps between indices, a max pool sits in the larger gaps),
  ``classifier.0`` (fc6, a ``Linear(C*7*7, 4096)`` over the flattened
  ``(C, H, W)`` map, stored by jft as a 7×7 conv kernel), ``classifier.3`` (fc7),
  ``classifier.6`` (head);
- timm: the same ``features.{n}``, ``pre_logits.fc1`` (7×7 conv, fc6),
  ``pre_logits.fc2`` (1×1 conv, fc7), ``head.fc`` (head);
- Keras, legacy ``.h5`` names: ``block{b}_conv{i}/kernel``, ``fc1`` (fc6, a
  ``Dense`` over the map flattened in ``(H, W, C)`` order, reshaped to a square
  ``(H, W, C, 4096)`` kernel), ``fc2`` (fc7), ``predictions`` (head);
- Keras 3 ``.weights.h5``, whose layers are named by class and order:
  ``conv2d``, ``conv2d_1``, ... (the block structure comes from their number: 8,
  10, 13 or 16 convs are VGG-11, -13, -16, -19) and ``dense``, ``dense_1``,
  ``dense_2`` (three denses are fc6, fc7, head; two fc6, fc7; one the head).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register
from jft.weights.keymaps._common import conv_kernel, dense_kernel

# Convs per block of the standard VGGs, by their total number of convs.
_STAGES = {8: (1, 1, 2, 2, 2), 10: (2, 2, 2, 2, 2), 13: (2, 2, 3, 3, 3), 16: (2, 2, 4, 4, 4)}


def _block_names(stages: tuple[int, ...]) -> list[str]:
    return [f"conv{b + 1}_{i + 1}" for b, n in enumerate(stages) for i in range(n)]


def _fc6_from_flat(w: np.ndarray, channels: int, order: str) -> np.ndarray:
    """A fc6 matrix over a flattened map -> a ``(H, W, C, O)`` conv kernel."""
    hw = w.size // (w.shape[0] * channels) if order == "chw" else w.shape[0] // channels
    side = math.isqrt(hw)
    if side * side != hw:
        return w  # not a square map: restore reports the shape mismatch
    if order == "chw":  # torch (O, C*H*W)
        return conv_kernel(w.reshape(w.shape[0], channels, side, side))
    return w.reshape(side, side, channels, w.shape[1])  # Keras (H*W*C, O)


def _torch(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    mapped: dict[str, np.ndarray] = {}
    unused: list[str] = []
    convs = sorted(
        {
            int(m[1])
            for k, v in flat.items()
            if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.ndim == 4
        }
    )
    gaps = [b - a for a, b in zip(convs, convs[1:], strict=False)]
    step = min(gaps, default=0)
    names, block, i = {}, 1, 1
    for n, gap in zip(convs, [step, *gaps], strict=True):
        if gap != step:
            block, i = block + 1, 1
        names[n] = f"conv{block}_{i}"
        i += 1
    channels = flat[f"features.{convs[-1]}.weight"].shape[0] if convs else 0
    for key, value in flat.items():
        m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if m and int(m[1]) in names:
            path = f"params/backbone/{names[int(m[1])]}"
            mapped[f"{path}/{'kernel' if m[2] == 'weight' else 'bias'}"] = (
                conv_kernel(value) if m[2] == "weight" else value
            )
            continue
        module, _, leaf = key.rpartition(".")
        target = {
            "classifier.0": "backbone/fc6",
            "pre_logits.fc1": "backbone/fc6",
            "classifier.3": "backbone/fc7",
            "pre_logits.fc2": "backbone/fc7",
            "classifier.6": "head",
            "head.fc": "head",
        }.get(module)
        if target is None or leaf not in ("weight", "bias"):
            unused.append(key)
        elif leaf == "bias":
            mapped[f"params/{target}/bias"] = value
        elif target == "backbone/fc6":
            kernel = (
                conv_kernel(value) if value.ndim == 4 else _fc6_from_flat(value, channels, "chw")
            )
            mapped[f"params/{target}/kernel"] = kernel
        else:
            mapped[f"params/{target}/kernel"] = dense_kernel(value)
    return mapped, unused


def _keras(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    # Both Keras namings are reduced to (jft module, leaf) first.
    legacy = {"fc1": "backbone/fc6", "fc2": "backbone/fc7", "predictions": "head"}
    convs3 = sorted(
        {
            int(m[1] or 0)
            for k in flat
            if (m := re.fullmatch(r"(?:.*/)?conv2d(?:_(\d+))?/kernel", k))
        }
    )
    conv3_names = dict(zip(convs3, _block_names(_STAGES.get(len(convs3), ())), strict=False))
    dense3 = sorted(
        {int(m[1] or 0) for k in flat if (m := re.fullmatch(r"(?:.*/)?dense(?:_(\d+))?/kernel", k))}
    )
    targets = {1: ["head"], 2: ["backbone/fc6", "backbone/fc7"]}.get(
        len(dense3), ["backbone/fc6", "backbone/fc7", "head"]
    )
    dense3_names = dict(zip(dense3, targets, strict=False))

    modules: dict[str, tuple[str, str]] = {}
    for key in flat:
        layer, _, leaf = key.rpartition("/")
        layer = layer.rsplit("/", 1)[-1]
        if m := re.fullmatch(r"block(\d+)_conv(\d+)", layer):
            modules[key] = (f"backbone/conv{m[1]}_{m[2]}", leaf)
        elif layer in legacy:
            modules[key] = (legacy[layer], leaf)
        elif (m := re.fullmatch(r"conv2d(?:_(\d+))?", layer)) and int(m[1] or 0) in conv3_names:
            modules[key] = (f"backbone/{conv3_names[int(m[1] or 0)]}", leaf)
        elif (m := re.fullmatch(r"dense(?:_(\d+))?", layer)) and int(m[1] or 0) in dense3_names:
            modules[key] = (dense3_names[int(m[1] or 0)], leaf)

    conv_biases = sorted(
        (module, key)
        for key, (module, leaf) in modules.items()
        if leaf == "bias" and module.startswith("backbone/conv")
    )
    channels = flat[conv_biases[-1][1]].shape[0] if conv_biases else 0
    mapped: dict[str, np.ndarray] = {}
    unused: list[str] = []
    for key, value in flat.items():
        if key not in modules or modules[key][1] not in ("kernel", "bias"):
            unused.append(key)
            continue
        module, leaf = modules[key]
        if module == "backbone/fc6" and leaf == "kernel" and value.ndim == 2:
            value = _fc6_from_flat(value, channels, "hwc")
        mapped[f"params/{module}/{leaf}"] = value
    return mapped, unused


@register("vgg")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps torchvision, timm or Keras VGG names to jft variable paths."""
    if any(k.startswith("features.") for k in flat):
        return _torch(flat)
    return _keras(flat)
