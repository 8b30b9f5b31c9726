"""Building blocks shared by the jft models: BatchNorm with frozen layers, pooling, activations."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
}


def activation(name: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function named ``name`` (or ``name`` itself if callable).

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    if callable(name):
        return name
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


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

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
        """Normalizes ``x`` over all axes but the last."""
        frozen = is_frozen("/".join(self.scope.path), self.frozen)
        return super().__call__(x, use_running_average=(not train) or frozen)


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


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: jax.lax.ConvDimensionNumbers | None = None,
    feature_group_count: int = 1,
    precision: jax.lax.PrecisionLike = None,
    **kwargs,
) -> jax.Array:
    """``jax.lax.conv_general_dilated``, with a fast path for tiny feature maps on the CPU.

    XLA:CPU runs a k×k convolution over a 2×2 map with many channels (ResNet's
    last stage at 64×64 input: 512→512 on 2×2) some 50× slower than the same
    product written as image patches times the kernel matrix (900 ms against
    12 ms for a batch of 32 on 2 cores, and the same for the backward pass). On
    such maps, and only on the CPU backend, this computes it that way; anywhere
    else it is ``lax.conv_general_dilated``. Pass it to ``nn.Conv(...,
    conv_general_dilated=conv_general_dilated)``: parameters are unchanged.
    """
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    nhwc = lhs.ndim == 4 and dimension_numbers == jax.lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, _NHWC
    )
    if (
        jax.default_backend() == "cpu"
        and nhwc
        and not dilated
        and feature_group_count == 1
        and not kwargs
        and max(lhs.shape[1:3]) <= 2
        and rhs.shape[0] * rhs.shape[1] > 1
        and lhs.shape[3] >= 128
    ):
        patches = jax.lax.conv_general_dilated_patches(
            lhs,
            rhs.shape[:2],
            window_strides,
            padding,
            dimension_numbers=_NHWC,
            precision=precision,
        )
        # Patch features are ordered (channel, kernel row, kernel column).
        kernel = jnp.transpose(rhs, (2, 0, 1, 3)).reshape(-1, rhs.shape[3])
        return jnp.einsum(
            "nhwk,ko->nhwo", patches, kernel.astype(patches.dtype), precision=precision
        )
    if jax.default_backend() == "cpu" and nhwc and not dilated and feature_group_count == 1:
        if not kwargs:
            pads = padding
            if isinstance(padding, str):
                pads = jax.lax.padtype_to_pads(
                    lhs.shape[1:3], rhs.shape[:2], window_strides, padding
                )
            return _conv_cpu(tuple(window_strides), tuple(map(tuple, pads)), precision, lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


def _conv_nhwc(strides, pads, precision, x, w):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_cpu(strides, pads, precision, x, w):
    # An NHWC convolution whose kernel gradient is a sum of shifted matmuls (below).
    return _conv_nhwc(strides, pads, precision, x, w)


def _conv_cpu_fwd(strides, pads, precision, x, w):
    return _conv_nhwc(strides, pads, precision, x, w), (x, w)


def _conv_cpu_bwd(strides, pads, precision, res, g):
    # XLA:CPU computes a convolution's kernel gradient 2-4x slower than the
    # convolution itself (15.6 ms against 4.4 for 32->64 channels on 16x16, batch
    # 64). Written as one (C_in x N*H*W) @ (N*H*W x C_out) matmul per kernel tap over
    # the shifted input it takes 5 ms. The input gradient stays XLA's own.
    x, w = res
    kh, kw, ci, co = w.shape
    n, ho, wo, _ = g.shape
    if strides == (1, 1):
        _, vjp = jax.vjp(lambda x: _conv_nhwc(strides, pads, precision, x, w), x)
        (dx,) = vjp(g)
    else:
        dx = _strided_conv_input_grad(strides, pads, precision, x.shape, w, g)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    gm = g.reshape(-1, co)
    taps = []
    for i in range(kh):
        for j in range(kw):
            xs = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + strides[0] * (ho - 1) + 1, j + strides[1] * (wo - 1) + 1, ci),
                (1, strides[0], strides[1], 1),
            )
            taps.append(jnp.matmul(xs.reshape(-1, ci).T, gm, precision=precision))
    dw = jnp.stack(taps).reshape(kh, kw, ci, co).astype(w.dtype)
    return dx, dw


def _strided_conv_input_grad(strides, pads, precision, x_shape, w, g):
    # The input gradient of a strided convolution, which XLA:CPU runs as a
    # base-dilated convolution: 58 ms for ResNet-18's 256->512 stride-2 conv onto a
    # 2x2 map (batch 32), against 2 ms as one (g @ kernel tap^T) per tap, each
    # spread back onto the input grid with interior padding.
    kh, kw, _, _ = w.shape
    _, ho, wo, _ = g.shape
    (pt, pb), (pl, pr) = pads
    h, wd = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    sh, sw = strides
    zero = jnp.zeros((), g.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            c = jnp.matmul(g, w[i, j].T.astype(g.dtype), precision=precision)
            c = jax.lax.pad(
                c,
                zero,
                (
                    (0, 0, 0),
                    (i, h - i - (sh * (ho - 1) + 1), sh - 1),
                    (j, wd - j - (sw * (wo - 1) + 1), sw - 1),
                    (0, 0, 0),
                ),
            )
            out = c if out is None else out + c
    return out[:, pt : h - pb, pl : wd - pr, :]


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def max_pool(
    x: jax.Array,
    window_shape: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``nn.max_pool`` on NHWC maps as a maximum over the window's strided slices.

    The values are ``nn.max_pool``'s; the gradient is a chain of elementwise
    selects instead of XLA's select-and-scatter, which XLA:CPU runs 5-20x slower
    (23 ms against 4 for a 2×2 pool of a 64×32×32×32 batch). Where a window has
    several equal maxima the gradient is shared among them rather than given to
    one.
    """
    kh, kw = window_shape
    sh, sw = strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    n, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(
                x,
                (0, i, j, 0),
                (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                (1, sh, sw, 1),
            )
            out = tap if out is None else jnp.maximum(out, tap)
    return out
