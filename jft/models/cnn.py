"""A small convolutional classifier for 8×8 to 32×32 images (the ``jft train`` default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models.layers import ImageClassifier, batch_norm, conv, max_pool
from jft.models.registry import register

__all__ = ["CNN", "CNNBackbone", "cnn"]

Dtype = Any


class CNNBackbone(nn.Module):
    """Conv 3×3, BatchNorm, ReLU per stage, a 2×2 max pool between stages.

    Returns the globally average-pooled features ``(B, widths[-1])``, or with
    ``features_only`` the last feature map.

    Attributes: see :class:`CNN`.
    """

    widths: Sequence[int] = (32, 64, 128)
    dtype: Dtype = jnp.float32
    frozen_bn: tuple[str, ...] = ()
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features_only: bool = False) -> jax.Array:
        if x.ndim == 3:  # (B, H, W) grayscale
            x = x[..., None]
        x = jnp.asarray(x, self.dtype)
        for i, w in enumerate(self.widths):
            if i and min(x.shape[1:3]) >= 2:
                x = max_pool(x, (2, 2), (2, 2))
            x = conv(w, 3, dtype=self.dtype, name=f"conv{i + 1}")(x)
            x = batch_norm(self, f"bn{i + 1}")(x, train)
            x = nn.relu(x)
        if features_only:
            return x
        return jnp.mean(x, axis=(1, 2))


class CNN(ImageClassifier):
    """A small CNN: ``backbone/conv{i}``, ``backbone/bn{i}``, dropout, ``head``.

    For NHWC images from 8×8 (sklearn digits, 8×8×1; a ``(B, H, W)`` input is
    taken as one channel) to 32×32. ``model.apply(variables, x, train=False)``
    returns logits ``(B, num_classes)``, or the pooled features when
    ``num_classes=0``.

    Attributes:
      widths: channels of each stage; stages after the first start with a 2×2
        max pool (skipped once the map is 1 pixel wide).
      num_classes: classes of the head; 0 for no head.
      dropout_rate: dropout before the head in train mode (rng ``"dropout"``).
      dtype: compute dtype (parameters stay float32).
      frozen_bn: regexes over BatchNorm module paths that always use their
        running statistics (see :class:`jft.models.layers.BatchNorm`).
      bn_axis_name: the axis over which BatchNorm averages its batch statistics
        (``nn.BatchNorm.axis_name``); the pmap train step sets it.
    """

    widths: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    frozen_bn: tuple[str, ...] = ()
    bn_axis_name: str | None = None

    def setup(self) -> None:
        self.backbone = CNNBackbone(
            tuple(self.widths), self.dtype, tuple(self.frozen_bn), self.bn_axis_name
        )
        self.dropout = nn.Dropout(self.dropout_rate)
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def before_head(self, x: jax.Array, train: bool) -> jax.Array:
        """Dropout before the head in train mode."""
        return self.dropout(x, deterministic=not train)


@register("cnn")
def cnn(
    widths: Sequence[int] = (32, 64, 128),
    num_classes: int = 10,
    *,
    dropout_rate: float = 0.1,
    dtype: Dtype = jnp.float32,
    frozen_bn: Sequence[str] = (),
) -> CNN:
    """A small CNN classifier; see :class:`CNN`.

    >>> import jax, jax.numpy as jnp
    >>> model = cnn(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """
    return CNN(tuple(widths), num_classes, dropout_rate, dtype, tuple(frozen_bn))
