"""``resnet`` key map: torchvision/timm and Hugging Face ResNet names <-> jft paths.

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
counter Flax does not keep) is dropped silently on import and written as 0 on
export, so ``load_state_dict`` takes the file strictly.

Export layouts: ``"torchvision"`` and ``"timm"`` (the same names) and ``"hf"``
(``ResNetModel``, or ``ResNetForImageClassification`` with a head).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register, register_inverse
from jft.weights.keymaps._table import BATCH_NORM, CONV_NO_BIAS, LINEAR, Rule, Table

__all__ = ["HEAD_PREFIX", "HF_RULES", "TORCH_RULES", "convert", "export"]

_B = "backbone/layer{s}_{b}"
TORCH_RULES = (
    Rule("conv1", "backbone/conv1", CONV_NO_BIAS),
    Rule("bn1", "backbone/bn1", BATCH_NORM),
    Rule("layer{s}.{b}.conv{k}", f"{_B}/conv{{k}}", CONV_NO_BIAS),
    Rule("layer{s}.{b}.bn{k}", f"{_B}/bn{{k}}", BATCH_NORM),
    Rule("layer{s}.{b}.downsample.0", f"{_B}/downsample_conv", CONV_NO_BIAS),
    Rule("layer{s}.{b}.downsample.1", f"{_B}/downsample_bn", BATCH_NORM),
    Rule("fc", "head", LINEAR),
)
_HF_B = "encoder.stages.{s-1}.layers.{b}"
HF_RULES = (
    Rule("embedder.embedder.convolution", "backbone/conv1", CONV_NO_BIAS),
    Rule("embedder.embedder.normalization", "backbone/bn1", BATCH_NORM),
    Rule(f"{_HF_B}.layer.{{k-1}}.convolution", f"{_B}/conv{{k}}", CONV_NO_BIAS),
    Rule(f"{_HF_B}.layer.{{k-1}}.normalization", f"{_B}/bn{{k}}", BATCH_NORM),
    Rule(f"{_HF_B}.shortcut.convolution", f"{_B}/downsample_conv", CONV_NO_BIAS),
    Rule(f"{_HF_B}.shortcut.normalization", f"{_B}/downsample_bn", BATCH_NORM),
    Rule("classifier.1", "head", LINEAR, top=True),
)
HEAD_PREFIX = "resnet."  # ResNetForImageClassification keeps the trunk under this prefix


@register("resnet")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps torchvision/timm or Hugging Face ResNet names to jft variable paths."""
    hf = [
        k for k in flat if k.split(".", 1)[-1].startswith("embedder.") or k.startswith("embedder.")
    ]
    if hf:
        prefix = HEAD_PREFIX if hf[0].startswith(HEAD_PREFIX) else ""
        return Table(HF_RULES, prefix=prefix).forward(flat)
    return Table(TORCH_RULES).forward(flat)


@register_inverse("resnet", layouts=("torchvision", "timm", "hf"))
def export(
    mapped: Mapping[str, np.ndarray], layout: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """jft ResNet variables -> torchvision/timm names, or HF ``ResNet*`` names (``layout="hf"``)."""
    if layout in ("torchvision", "timm"):
        return Table(TORCH_RULES).inverse(mapped)
    if layout != "hf":
        raise ValueError(f"resnet exports to layouts torchvision, timm and hf, not {layout!r}")
    has_head = any(p.startswith("params/head/") for p in mapped)
    return Table(HF_RULES, prefix=HEAD_PREFIX if has_head else "").inverse(mapped)
