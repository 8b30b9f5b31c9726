"""``vgg`` key map: torchvision, timm and Keras VGG names <-> jft paths.

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
  ``dense_2`` (three denses are fc6, fc7, head; two fc6, fc7; one the head);
  they are renamed to the legacy names before the table is applied.

The tables are built from the number of convs per block (read from the names on
import, from the jft paths on export). Export layouts: ``"torchvision"``,
``"timm"`` and ``"keras"`` (legacy ``.h5`` names, which ``model.load_weights(...,
by_name=True)`` matches). The recipe model :func:`jft.models.vgg16_flatten`
(``fc`` and ``head`` over the flattened conv map) exports its two Dense layers
under Keras names ``fc`` and ``head``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register, register_inverse
from jft.weights.keymaps._common import conv_kernel, dense_kernel
from jft.weights.keymaps._table import (
    CONV,
    KERAS_DENSE,
    LINEAR,
    Context,
    Leaf,
    Rule,
    Table,
)

__all__ = ["convert", "export", "keras_table", "torch_table"]

# Convs per block of the standard VGGs, by their total number of convs.
_STAGES = {8: (1, 1, 2, 2, 2), 10: (2, 2, 2, 2, 2), 13: (2, 2, 3, 3, 3), 16: (2, 2, 4, 4, 4)}


def _block_names(stages: tuple[int, ...]) -> list[str]:
    return [f"conv{b + 1}_{i + 1}" for b, n in enumerate(stages) for i in range(n)]


def _side(hw: int) -> int | None:
    side = math.isqrt(hw)
    return side if side * side == hw else None


def _fc6_from_chw(w: np.ndarray, ctx: Context) -> np.ndarray:
    """torch fc6: ``(O, C*H*W)`` (or a 7×7 conv) -> a ``(H, W, C, O)`` conv kernel."""
    if w.ndim == 4:
        return conv_kernel(w)
    channels = ctx["channels"]
    side = _side(w.size // (w.shape[0] * channels)) if channels else None
    if side is None:
        return w  # not a square map: restore reports the shape mismatch
    return conv_kernel(w.reshape(w.shape[0], channels, side, side))


def _fc6_to_chw(k: np.ndarray, ctx: Context) -> np.ndarray:
    del ctx
    return np.transpose(k, (3, 2, 0, 1)).reshape(k.shape[3], -1)


def _fc6_from_hwc(w: np.ndarray, ctx: Context) -> np.ndarray:
    """Keras fc1: ``(H*W*C, O)`` -> ``(H, W, C, O)``."""
    channels = ctx["channels"]
    side = _side(w.shape[0] // channels) if channels and w.ndim == 2 else None
    return w if side is None else w.reshape(side, side, channels, w.shape[1])


def _fc6_to_hwc(k: np.ndarray, ctx: Context) -> np.ndarray:
    del ctx
    return k.reshape(-1, k.shape[-1])


def _conv1x1_to_dense(w: np.ndarray, ctx: Context) -> np.ndarray:
    del ctx
    return dense_kernel(w)


def _dense_to_conv1x1(k: np.ndarray, ctx: Context) -> np.ndarray:
    del ctx
    return k.T.reshape(k.shape[1], k.shape[0], 1, 1)


_TORCH_FC6 = (Leaf("weight", "kernel", to_jft=_fc6_from_chw, to_src=_fc6_to_chw), LINEAR[1])
_CONV1X1 = (Leaf("weight", "kernel", to_jft=_conv1x1_to_dense, to_src=_dense_to_conv1x1), LINEAR[1])
_KERAS_FC6 = (Leaf("kernel", "kernel", to_jft=_fc6_from_hwc, to_src=_fc6_to_hwc), KERAS_DENSE[1])
_FC_RULES = {
    "torchvision": (
        Rule("classifier.0", "backbone/fc6", _TORCH_FC6),
        Rule("classifier.3", "backbone/fc7", LINEAR),
        Rule("classifier.6", "head", LINEAR),
    ),
    "timm": (
        Rule("pre_logits.fc1", "backbone/fc6", CONV),
        Rule("pre_logits.fc2", "backbone/fc7", _CONV1X1),
        Rule("head.fc", "head", LINEAR),
    ),
}
_KERAS_TOP = (
    Rule("fc1", "backbone/fc6", _KERAS_FC6),
    Rule("fc2", "backbone/fc7", KERAS_DENSE),
    Rule("predictions", "head", KERAS_DENSE),
)
_KERAS_FLATTEN_HEAD = (Rule("fc", "fc", KERAS_DENSE), Rule("head", "head", KERAS_DENSE))


def torch_table(stages: tuple[int, ...], layout: str) -> Table:
    """torchvision/timm names: ``features.{n}`` (a ReLU after each conv, a pool per block)."""
    rules, n = [], 0
    for b, count in enumerate(stages):
        for i in range(count):
            rules.append(Rule(f"features.{n}", f"backbone/conv{b + 1}_{i + 1}", CONV))
            n += 2
        n += 1
    fc = _FC_RULES[layout] if layout in _FC_RULES else _FC_RULES["torchvision"] + _FC_RULES["timm"]
    return Table((*rules, *fc))


def keras_table(flatten_head: bool) -> Table:
    """Legacy Keras names: ``block{b}_conv{i}/kernel``, ``fc1``, ``fc2``, ``predictions``."""
    conv = Rule("block{b}_conv{i}", "backbone/conv{b}_{i}", KERAS_DENSE)
    return Table((conv, *(_KERAS_FLATTEN_HEAD if flatten_head else _KERAS_TOP)), sep="/")


def _torch(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    convs = sorted(
        {
            int(m[1])
            for k, v in flat.items()
            if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.ndim == 4
        }
    )
    gaps = [b - a for a, b in zip(convs, convs[1:], strict=False)]
    step = min(gaps, default=0)
    stages = [0]
    for gap in [step, *gaps]:
        if gap != step:
            stages.append(0)
        stages[-1] += 1
    # The table numbers convs as torchvision does (step 2, pools between blocks);
    # a file numbered otherwise is renamed to that numbering first.
    table = torch_table(tuple(stages) if convs else (), "")
    ours = [int(r.src.split(".")[1]) for r in table.rules if r.src.startswith("features.")]
    renumber = dict(zip(convs, ours, strict=False))
    renamed, original = {}, {}
    for key, value in flat.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        new = f"features.{renumber[int(m[1])]}.{m[2]}" if m and int(m[1]) in renumber else key
        renamed[new], original[new] = value, key
    channels = flat[f"features.{convs[-1]}.weight"].shape[0] if convs else 0
    mapped, unused = table.forward(renamed, {"channels": channels})
    return mapped, [original[k] for k in unused]


def _keras3_to_legacy(flat: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Keras 3 layer names (``conv2d_3``, ``dense_1``) -> legacy VGG names, by count."""
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
    targets = {1: ["predictions"], 2: ["fc1", "fc2"]}.get(
        len(dense3), ["fc1", "fc2", "predictions"]
    )
    dense3_names = dict(zip(dense3, targets, strict=False))
    names = {}
    for key in flat:
        layer, _, leaf = key.rpartition("/")
        layer = layer.rsplit("/", 1)[-1]
        if (m := re.fullmatch(r"conv2d(?:_(\d+))?", layer)) and int(m[1] or 0) in conv3_names:
            b, i = conv3_names[int(m[1] or 0)][4:].split("_")
            names[key] = f"block{b}_conv{i}/{leaf}"
        elif (m := re.fullmatch(r"dense(?:_(\d+))?", layer)) and int(m[1] or 0) in dense3_names:
            names[key] = f"{dense3_names[int(m[1] or 0)]}/{leaf}"
        else:  # legacy names, possibly nested (``model_weights/block1_conv1/block1_conv1/kernel``)
            names[key] = f"{layer}/{leaf}" if layer else key
    return names


def _keras(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    names = _keras3_to_legacy(flat)
    renamed = {names[k]: v for k, v in flat.items()}
    original = {names[k]: k for k in flat}
    biases = sorted(
        (tuple(map(int, m.groups())), k)
        for k in renamed
        if (m := re.fullmatch(r"block(\d+)_conv(\d+)/bias", k))
    )
    channels = renamed[biases[-1][1]].shape[0] if biases else 0
    flatten_head = any(k.startswith("fc/") for k in renamed)
    mapped, unused = keras_table(flatten_head).forward(renamed, {"channels": channels})
    return mapped, [original[k] for k in unused]


@register("vgg")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps torchvision, timm or Keras VGG names to jft variable paths."""
    if any(k.startswith("features.") for k in flat):
        return _torch(flat)
    return _keras(flat)


@register_inverse("vgg", layouts=("torchvision", "timm", "keras"))
def export(
    mapped: Mapping[str, np.ndarray], layout: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """jft VGG variables -> torchvision, timm or legacy Keras names (``layout``)."""
    if layout == "keras":
        return keras_table(any(p.startswith("params/fc/") for p in mapped)).inverse(mapped)
    if layout not in _FC_RULES:
        raise ValueError(f"vgg exports to layouts torchvision, timm and keras, not {layout!r}")
    blocks: dict[int, int] = {}
    for path in mapped:
        if m := re.fullmatch(r"params/backbone/conv(\d+)_(\d+)/kernel", path):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]))
    stages = tuple(blocks.get(b, 0) for b in range(1, max(blocks, default=0) + 1))
    return torch_table(stages, layout).inverse(mapped)
