"""ResNet (He et al. 2015) in the torchvision/timm layout, loadable from their weights.

Parameter paths follow torchvision's names: ``backbone/conv1``, ``backbone/bn1``,
``backbone/layer{stage}_{block}/conv1|bn1|conv2|bn2[|conv3|bn3]``,
``backbone/layer{stage}_{block}/downsample_conv|downsample_bn`` and ``head``.
The same module also builds the Hugging Face ``ResNetModel`` family, whose
checkpoints the ``resnet`` key map renames to these paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models.layers import ImageClassifier, batch_norm, conv, fields_for, max_pool
from jft.models.registry import register

__all__ = ["ResNet", "ResNetBackbone", "ResNetBlock", "resnet", "resnet18", "resnet34", "resnet50"]

Dtype = Any


class _BlockFields(nn.Module):
    """The fields that the trunk passes on to every block (by name, :func:`fields_for`)."""

    block: str = "basic"
    stride_in_1x1: bool = False
    dtype: Dtype = jnp.float32
    frozen_bn: tuple[str, ...] = ()
    bn_axis_name: str | None = None


class ResNetBlock(_BlockFields):
    """A residual block: ``basic`` (two 3×3 convs) or ``bottleneck`` (1×1, 3×3, 1×1).

    Attributes:
      features: output channels of the block.
      strides: the block's stride.
      block: ``"basic"`` or ``"bottleneck"`` (whose inner width is ``features // 4``).
      stride_in_1x1: bottleneck only: put the stride on the first 1×1 conv
        (ResNet v1, HF ``downsample_in_bottleneck=True``) instead of the 3×3 conv
        (torchvision/timm "v1.5", HF's default).
      dtype: compute dtype.
      frozen_bn: see :class:`jft.models.layers.BatchNorm`.
      bn_axis_name: see :class:`ResNet`.
    """

    features: int = 64
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv_bn(y, features, k, s, name, bn_name):
            y = conv(features, k, s, dtype=self.dtype, name=name)(y)
            return batch_norm(self, bn_name)(y, train)

        s = self.strides
        if self.block == "basic":
            y = nn.relu(conv_bn(x, self.features, 3, s, "conv1", "bn1"))
            y = conv_bn(y, self.features, 3, 1, "conv2", "bn2")
        elif self.block == "bottleneck":
            mid = self.features // 4
            s1, s3 = (s, 1) if self.stride_in_1x1 else (1, s)
            y = nn.relu(conv_bn(x, mid, 1, s1, "conv1", "bn1"))
            y = nn.relu(conv_bn(y, mid, 3, s3, "conv2", "bn2"))
            y = conv_bn(y, self.features, 1, 1, "conv3", "bn3")
        else:
            raise ValueError(f"unknown block {self.block!r}; expected 'basic' or 'bottleneck'")
        if x.shape[-1] != self.features or s != 1:
            x = conv_bn(x, self.features, 1, s, "downsample_conv", "downsample_bn")
        return nn.relu(y + x)


class ResNetBackbone(_BlockFields):
    """The ResNet trunk: stem and stages, then a global average pool.

    Attributes: see :class:`ResNet`.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    first_stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        """NHWC images -> pooled features ``(B, C)``, or the last feature map."""
        x = jnp.asarray(x, self.dtype)
        x = conv(self.stem_width, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = batch_norm(self, "bn1")(x, train)
        x = nn.relu(x)
        x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(n):
                strides = (self.first_stride if i == 0 else 2) if j == 0 else 1
                fields = fields_for(ResNetBlock, self, features=width, strides=strides)
                x = ResNetBlock(**fields, name=f"layer{i + 1}_{j}")(x, train)
        return x if features_only else jnp.mean(x, axis=(1, 2))


class ResNet(ImageClassifier):
    """A ResNet classifier: ``backbone`` (stem, stages), global average pool, ``head``.

    ``model.apply(variables, x, train=False)`` returns logits ``(B, num_classes)``,
    or the pooled features ``(B, C)`` when ``num_classes=0``;
    ``model.apply(variables, x, method="features")`` returns the last feature map
    ``(B, H, W, C)`` (Hugging Face's ``last_hidden_state`` in NHWC).

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      widths: output channels of each stage (HF ``hidden_sizes``); for a
        bottleneck the inner width is a quarter of it.
      block: ``"basic"`` or ``"bottleneck"``.
      stem_width: channels of the 7×7 stem conv (HF ``embedding_size``).
      first_stride: stride of the first stage (HF ``downsample_in_first_stage``
        gives 2; torchvision 1).
      stride_in_1x1: see :class:`ResNetBlock` (HF ``downsample_in_bottleneck``).
      num_classes: classes of the head; 0 for no head.
      dtype: compute dtype (parameters stay float32).
      frozen_bn: regexes over BatchNorm module paths that always use their running
        statistics (see :class:`jft.models.layers.BatchNorm`).
      bn_axis_name: the axis over which BatchNorm averages its batch statistics
        (``nn.BatchNorm.axis_name``); the pmap train step sets it.
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    block: str = "basic"
    stem_width: int = 64
    first_stride: int = 1
    stride_in_1x1: bool = False
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    frozen_bn: tuple[str, ...] = ()
    bn_axis_name: str | None = None

    def setup(self) -> None:
        self.backbone = ResNetBackbone(
            **fields_for(
                ResNetBackbone,
                self,
                stage_sizes=tuple(self.stage_sizes),
                widths=tuple(self.widths),
                frozen_bn=tuple(self.frozen_bn),
            )
        )
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype)


@register("resnet")
def resnet(
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    block: str = "basic",
    *,
    widths: Sequence[int] | None = None,
    width: int = 64,
    stem_width: int = 64,
    first_stride: int = 1,
    stride_in_1x1: bool = False,
    num_classes: int = 1000,
    dtype: Dtype = jnp.float32,
    frozen_bn: Sequence[str] = (),
) -> ResNet:
    """A ResNet of any depth and width.

    Args:
      stage_sizes: blocks per stage.
      block: ``"basic"`` or ``"bottleneck"``.
      widths: output channels of each stage; default ``width * 2**i``, times 4 for
        bottleneck blocks (torchvision).
      width: base width used when ``widths`` is None.
      stem_width: channels of the stem conv.
      first_stride: stride of the first stage.
      stride_in_1x1: bottleneck stride on the first 1×1 conv (ResNet v1).
      num_classes: classes of the head; 0 returns pooled features.
      dtype: compute dtype.
      frozen_bn: regexes over BatchNorm module paths to freeze.

    For a Hugging Face ``ResNetConfig``::

        resnet(config.depths, config.layer_type, widths=config.hidden_sizes,
               stem_width=config.embedding_size,
               first_stride=2 if config.downsample_in_first_stage else 1,
               stride_in_1x1=config.downsample_in_bottleneck, num_classes=...)
    """
    if widths is None:
        expansion = 4 if block == "bottleneck" else 1
        widths = [width * expansion * 2**i for i in range(len(stage_sizes))]
    return ResNet(
        tuple(stage_sizes),
        tuple(widths),
        block,
        stem_width,
        first_stride,
        stride_in_1x1,
        num_classes,
        dtype,
        tuple(frozen_bn),
    )


@register("resnet18")
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision/timm ``resnet18``); ``kwargs`` as :func:`resnet`."""
    return resnet((2, 2, 2, 2), "basic", **kwargs)


@register("resnet34")
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision/timm ``resnet34``); ``kwargs`` as :func:`resnet`."""
    return resnet((3, 4, 6, 3), "basic", **kwargs)


@register("resnet50")
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision/timm ``resnet50``); ``kwargs`` as :func:`resnet`."""
    return resnet((3, 4, 6, 3), "bottleneck", **kwargs)
