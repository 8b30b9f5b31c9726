"""Building blocks shared by the jft models: BatchNorm with frozen layers, pooling, activations.

The convolution and max pool that the models pass around are :mod:`jft.ops`'s
(re-exported here with :func:`compiler_options`): XLA's own ops on GPU and
TPU, faster formulations on the CPU, equal values and gradients.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft import ops
from jft.errors import JftError
from jft.ops import compiler_options, conv_general_dilated, max_pool

__all__ = [
    "ACTIVATIONS",
    "ActivationError",
    "BatchNorm",
    "activation",
    "ImageClassifier",
    "adaptive_avg_pool",
    "batch_norm",
    "compiler_options",
    "conv",
    "conv_general_dilated",
    "dense",
    "fields_for",
    "is_frozen",
    "max_pool",
    "torch_padding",
]


def _gelu_exact(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=True)


# One table, with Hugging Face's names (a config's ``hidden_act``) and PyTorch's
# meanings: "gelu" is the exact erf GELU (``torch.nn.GELU()``, BERT, ViT);
# "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation
# (``torch.nn.GELU(approximate="tanh")``, GPT-2).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
}


class ActivationError(JftError, ValueError):
    """An activation name that :data:`ACTIVATIONS` does not hold."""


def dense(features: int, **kwargs: Any) -> nn.Dense:
    """``nn.Dense(features, **kwargs)`` whose product is :func:`jft.ops.dot_general`
    (the CPU's faster formulation; the same parameters and values)."""
    return nn.Dense(features, dot_general=ops.dot_general, **kwargs)


def activation(name: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """The activation function named ``name`` in :data:`ACTIVATIONS` (``name`` itself if callable).

    Names are Hugging Face's (``hidden_act``): ``"gelu"`` is the exact erf GELU,
    ``"gelu_new"``/``"gelu_pytorch_tanh"`` its tanh approximation.

    >>> round(float(activation("gelu")(1.0)), 5), round(float(activation("gelu_new")(1.0)), 5)
    (0.84134, 0.84119)

    Raises:
      ActivationError: an unknown name; the message lists the known ones.
    """
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ActivationError(
            f"unknown activation {name!r}; use one of {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


def is_frozen(path: str, frozen: Sequence[str]) -> bool:
    """Whether the module ``path`` (``backbone/layer1_0/bn1``) matches a ``frozen`` regex."""
    return any(re.fullmatch(p, path) for p in frozen)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with PyTorch's defaults and Keras-style frozen layers.

    Call it as ``bn(x, train)``. With ``train=True`` it normalizes with the batch
    statistics and updates the running ones (``mutable=["batch_stats"]``), unless
    its module path (``backbone/layer1_0/bn1``) fully matches one of the ``frozen``
    regexes: a frozen BatchNorm always uses, and never updates, its running
    statistics, as Keras does for a layer with ``trainable=False``.

    The defaults match ``torch.nn.BatchNorm2d``: ``epsilon=1e-5`` and
    ``momentum=0.9`` (PyTorch's ``momentum=0.1`` weights the new batch, Flax's the
    old average). The running variance is updated with the biased batch variance,
    where PyTorch uses the unbiased one; eval-mode outputs are unaffected.

    Attributes:
      frozen: regexes over module paths of BatchNorm layers to freeze.
    """

    momentum: float = 0.9
    frozen: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
        """Normalizes ``x`` over all axes but the last."""
        frozen = is_frozen("/".join(self.scope.path), self.frozen)
        plain = (
            self.axis in (-1, x.ndim - 1)
            and self.use_bias
            and self.use_scale
            and self.use_fast_variance
            and self.force_float32_reductions
            and self.axis_index_groups is None
        )
        if not train or frozen or self.is_initializing() or not plain:
            return super().__call__(x, use_running_average=(not train) or frozen)
        # Train mode: nn.BatchNorm's statistics and output through jft.ops, which
        # writes the backward pass out on the CPU.
        features = (x.shape[-1],)
        zeros, ones = (lambda s: jnp.zeros(s, jnp.float32)), (lambda s: jnp.ones(s, jnp.float32))
        ra_mean = self.variable("batch_stats", "mean", zeros, features)
        ra_var = self.variable("batch_stats", "var", ones, features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = ops.batch_norm_train(
            x, scale, bias, epsilon=self.epsilon, axis_name=self.axis_name
        )
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return jnp.asarray(y, self.dtype or jnp.result_type(x, scale))


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    # PyTorch's bins: [floor(i * n / m), ceil((i + 1) * n / m)).
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool2d`` for NHWC input, same bins.

    It returns ``x`` unchanged when it already has ``output_size``.
    """
    h, w = x.shape[1:3]
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", mh, mw, x, precision=jax.lax.Precision.HIGHEST)


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric ``padding=kernel_size // 2`` as PyTorch convolutions use.

    Flax's ``"SAME"`` pads asymmetrically for a stride of 2 on even sizes, which
    would shift every pretrained feature map by one pixel.
    """
    p = kernel_size // 2
    return ((p, p), (p, p))


def conv(
    features: int, kernel: int, stride: int = 1, *, use_bias: bool = False, dtype: Any, name: str
) -> nn.Conv:
    """A square convolution as PyTorch's ``Conv2d(padding=kernel // 2)``, through :mod:`jft.ops`."""
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=torch_padding(kernel),
        use_bias=use_bias,
        dtype=dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def batch_norm(owner: nn.Module, name: str) -> BatchNorm:
    """A :class:`BatchNorm` with ``owner``'s ``dtype``, ``frozen_bn`` and ``bn_axis_name``."""
    return BatchNorm(
        dtype=owner.dtype, frozen=owner.frozen_bn, axis_name=owner.bn_axis_name, name=name
    )


class ImageClassifier(nn.Module):
    """The calls of the image classifiers (CNN, ResNet, VGG): a ``backbone``, then a ``head``.

    A subclass's ``setup`` makes ``self.backbone``, called as ``backbone(x, train,
    features_only=...)``, and, when ``num_classes`` is not 0, ``self.head``.
    """

    def before_head(self, x: jax.Array, train: bool) -> jax.Array:
        """The pooled features on their way to the head (CNN: dropout); here unchanged."""
        del train
        return x

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The last feature map ``(B, H, W, C)``."""
        return self.backbone(x, train, features_only=True)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(B, num_classes)``, or the pooled features when ``num_classes=0``."""
        x = self.backbone(x, train)
        return self.head(self.before_head(x, train)) if self.num_classes else x


def fields_for(module: type[nn.Module], source: nn.Module, **overrides: Any) -> dict[str, Any]:
    """``module``'s fields (all but ``parent`` and ``name``): ``overrides``, else ``source``'s.

    A model passes its configuration down this way, by name, never copied by
    position: ``BertLayer(**fields_for(BertLayer, self), name="layer_0")``.
    """
    names = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
    return {n: overrides[n] if n in overrides else getattr(source, n) for n in names}
