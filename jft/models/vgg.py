"""VGG (Simonyan and Zisserman 2014), loadable from torchvision, timm and Keras weights.

Parameter paths: ``backbone/conv{block}_{i}`` (3×3 convs), ``backbone/fc6`` (the
first fully connected layer, stored as a convolution over the last feature map),
``backbone/fc7`` and ``head``. The three sources differ only in how fc6 meets the
feature map, chosen by ``layout``:

- ``"torchvision"``: adaptive average pool to 7×7, flatten, ``Linear(512*7*7, 4096)``
  (= a 7×7 convolution over the 7×7 map);
- ``"timm"``: adaptive average pool up to at least 7×7, 7×7 convolution, 1×1
  convolution, global average pool (= torchvision for inputs up to 224×224);
- ``"keras"``: flatten the map as it is (any size, NHWC order), ``Dense(4096)`` (=
  a convolution whose kernel is the map size, so the model must be initialized
  at the input size of the Keras model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models.layers import ImageClassifier, adaptive_avg_pool, conv, max_pool
from jft.models.registry import register

__all__ = ["LAYOUTS", "VGG", "VGGBackbone", "VGGFlattenHead", "vgg", "vgg16", "vgg16_flatten"]

Dtype = Any
LAYOUTS = ("torchvision", "timm", "keras")


class VGGBackbone(nn.Module):
    """The VGG trunk: conv blocks, and with ``include_top`` fc6 and fc7.

    Returns ``(B, D)``: fc7's output (pooled over space) with ``include_top``,
    else the globally average-pooled last feature map. With
    ``features_only=True`` it returns the last feature map ``(B, H, W, C)``.

    Attributes: see :class:`VGG`.
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    include_top: bool = True
    layout: str = "torchvision"
    fc_width: int = 4096
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown VGG layout {self.layout!r}; expected one of {LAYOUTS}")
        x = jnp.asarray(x, self.dtype)
        for b, (n, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for i in range(n):
                name = f"conv{b + 1}_{i + 1}"
                x = conv(width, 3, use_bias=True, dtype=self.dtype, name=name)(x)
                x = nn.relu(x)
            x = max_pool(x, (2, 2), (2, 2))
        if features_only:
            return x
        if not self.include_top:
            return jnp.mean(x, axis=(1, 2))

        h, w = x.shape[1:3]
        if self.layout == "torchvision":
            x = adaptive_avg_pool(x, (7, 7))
            kernel = (7, 7)
        elif self.layout == "timm":
            x = adaptive_avg_pool(x, (max(7, h), max(7, w)))
            kernel = (7, 7)
        else:
            kernel = (h, w)
        x = nn.Conv(self.fc_width, kernel, padding="VALID", dtype=self.dtype, name="fc6")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.fc_width, dtype=self.dtype, name="fc7")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return jnp.mean(x, axis=(1, 2))


class VGG(ImageClassifier):
    """A VGG classifier: ``backbone`` (convs, fc6, fc7) and ``head``.

    ``model.apply(variables, x, train=False)`` returns logits ``(B, num_classes)``
    (Keras's ``predictions`` layer applies a softmax; jft returns the logits
    before it), or the backbone's ``(B, D)`` output when ``num_classes=0``.
    ``model.apply(variables, x, method="features")`` returns the last feature map
    after the fifth pool (Keras ``include_top=False, pooling=None``, torchvision
    ``model.features``).

    Attributes:
      stage_sizes: 3×3 convs per block, ``(2, 2, 3, 3, 3)`` for VGG-16.
      widths: channels per block.
      include_top: with fc6 and fc7 (4096 wide). Without them the head, if any,
        sits on the globally average-pooled conv features.
      layout: ``"torchvision"``, ``"timm"`` or ``"keras"``: how fc6 meets the feature
        map (see the module docstring). Their parameters have the same paths and
        shapes (for Keras at the input size it was built for).
      fc_width: width of fc6 and fc7.
      dropout_rate: dropout after fc6 and fc7 in train mode (torchvision's 0.5;
        Keras has none: pass 0).
      num_classes: classes of the head; 0 for no head.
      dtype: compute dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    include_top: bool = True
    layout: str = "torchvision"
    fc_width: int = 4096
    dropout_rate: float = 0.5
    num_classes: int = 1000
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.backbone = VGGBackbone(
            tuple(self.stage_sizes),
            tuple(self.widths),
            self.include_top,
            self.layout,
            self.fc_width,
            self.dropout_rate,
            self.dtype,
        )
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype)


@register("vgg")
def vgg(
    stage_sizes: Sequence[int] = (2, 2, 3, 3, 3),
    widths: Sequence[int] = (64, 128, 256, 512, 512),
    *,
    include_top: bool = True,
    layout: str = "torchvision",
    fc_width: int = 4096,
    dropout_rate: float = 0.5,
    num_classes: int = 1000,
    dtype: Dtype = jnp.float32,
) -> VGG:
    """A VGG of any depth; see :class:`VGG` for the arguments."""
    return VGG(
        tuple(stage_sizes),
        tuple(widths),
        include_top,
        layout,
        fc_width,
        dropout_rate,
        num_classes,
        dtype,
    )


@register("vgg16")
def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 (torchvision/timm ``vgg16``, Keras ``VGG16``); ``kwargs`` as :func:`vgg`."""
    return vgg((2, 2, 3, 3, 3), **kwargs)


class VGGFlattenHead(nn.Module):
    """A VGG conv base, then Flatten, ``Dense(hidden)`` + ReLU and ``head`` (the Keras recipe).

    The classic transfer set-up of the Keras guides: ``VGG16(include_top=False)``
    frozen, ``Flatten()``, ``Dense(1024, "relu")``, ``Dense(num_classes)``. Paths:
    ``backbone/conv{b}_{i}`` (load them from any VGG-16 weights), ``fc`` and ``head``.

    Attributes:
      hidden: width of the dense layer after the flatten.
      num_classes: classes of the head.
      dropout_rate: dropout after ``fc`` in train mode.
      dtype: compute dtype (parameters stay float32).
    """

    hidden: int = 1024
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """NHWC images (at least 32×32) -> logits ``(B, num_classes)``."""
        backbone = VGGBackbone(
            (2, 2, 3, 3, 3), (64, 128, 256, 512, 512), False, dtype=self.dtype, name="backbone"
        )
        x = backbone(x, train, features_only=True)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


@register("vgg16_flatten")
def vgg16_flatten(
    hidden: int = 1024,
    num_classes: int = 10,
    *,
    dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
) -> VGGFlattenHead:
    """VGG-16's conv base, Flatten, Dense(``hidden``), Dense(``num_classes``); see
    :class:`VGGFlattenHead`.

    >>> import jax, jax.numpy as jnp
    >>> model = vgg16_flatten(hidden=16, num_classes=10)
    >>> x = jnp.zeros((1, 32, 32, 3))
    >>> model.apply(model.init(jax.random.key(0), x), x).shape
    (1, 10)
    """
    return VGGFlattenHead(hidden, num_classes, dropout_rate, dtype)
