"""``resnet`` key map: torchvision/timm and Hugging Face ResNet names -> jft paths.

Accepted layouts (detected from the names):

- torchvision / timm: ``conv1.weight``, ``bn1.running_mean``,
  ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ``fc.weight``;
- Hugging Face ``ResNetModel`` / ``ResNetForImageClassification`` (with the
  ``resnet.`` prefix): ``embedder.embedder.convolution.weight``,
  ``encoder.stages.0.layers.0.layer.0.normalization.weight``,
  ``encoder.stages.1.layers.0.shortcut.convolution.weight``,
  ``classifier.1.weight``.

BatchNorm ``weight``/``bias`` go to ``params/.../scale|bias``, ``running_mean`` /
``running_var`` to ``batch_stats/.../mean|var``; ``num_batches_tracked`` (a step
counter Flax does not keep) is dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register
from jft.weights.keymaps._common import conv_kernel, dense_kernel

_BN = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}

_TV_MODULE = [
    (re.compile(r"(conv1|bn1)"), r"backbone/\1"),
    (re.compile(r"layer(\d+)\.(\d+)\.(conv\d|bn\d)"), r"backbone/layer\1_\2/\3"),
    (re.compile(r"layer(\d+)\.(\d+)\.downsample\.0"), r"backbone/layer\1_\2/downsample_conv"),
    (re.compile(r"layer(\d+)\.(\d+)\.downsample\.1"), r"backbone/layer\1_\2/downsample_bn"),
    (re.compile(r"fc"), "head"),
]


def _hf_module(name: str) -> str | None:
    if name.startswith("embedder.embedder.convolution"):
        return "backbone/conv1"
    if name.startswith("embedder.embedder.normalization"):
        return "backbone/bn1"
    if name == "classifier.1":
        return "head"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", name)
    if not m:
        return None
    block = f"backbone/layer{int(m[1]) + 1}_{m[2]}"
    rest = m[3]
    k = re.fullmatch(r"layer\.(\d+)\.(convolution|normalization)", rest)
    if k:
        kind = "conv" if k[2] == "convolution" else "bn"
        return f"{block}/{kind}{int(k[1]) + 1}"
    k = re.fullmatch(r"shortcut\.(convolution|normalization)", rest)
    if k:
        return f"{block}/downsample_{'conv' if k[1] == 'convolution' else 'bn'}"
    return None


def _tv_module(name: str) -> str | None:
    for pattern, repl in _TV_MODULE:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


@register("resnet")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps torchvision/timm or Hugging Face ResNet names to jft variable paths."""
    hf = any(k.split(".", 1)[-1].startswith("embedder.") or k.startswith("embedder.") for k in flat)
    mapped: dict[str, np.ndarray] = {}
    unused: list[str] = []
    for key, value in flat.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if hf:
            module = module.removeprefix("resnet.")
            path = _hf_module(module)
        else:
            path = _tv_module(module)
        if path is None:
            unused.append(key)
            continue
        is_bn = path.rsplit("/", 1)[-1].startswith(("bn", "downsample_bn"))
        if is_bn and leaf in _BN:
            collection, name = _BN[leaf]
            mapped[f"{collection}/{path}/{name}"] = value
        elif leaf == "weight" and value.ndim == 4:
            mapped[f"params/{path}/kernel"] = conv_kernel(value)
        elif leaf == "weight" and value.ndim == 2:
            mapped[f"params/{path}/kernel"] = dense_kernel(value)
        elif leaf == "bias":
            mapped[f"params/{path}/bias"] = value
        else:
            unused.append(key)
    return mapped, unused
