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
        # Train mode: the same statistics and output as nn.BatchNorm, with the
        # backward pass written out (two per-channel sums and one elementwise pass;
        # autodiff of the forward makes XLA:CPU take several more passes).
        features = (x.shape[-1],)
        zeros, ones = (lambda s: jnp.zeros(s, jnp.float32)), (lambda s: jnp.ones(s, jnp.float32))
        ra_mean = self.variable("batch_stats", "mean", zeros, features)
        ra_var = self.variable("batch_stats", "var", ones, features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = _batch_norm_train(self.epsilon, self.axis_name, x, scale, bias)
        mean, var = jax.lax.stop_gradient((mean, var))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return jnp.asarray(y, self.dtype or jnp.result_type(x, scale))


def _bn_stats(axis_name, x):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean, mean2 = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)
    if axis_name is not None:
        mean, mean2 = jax.lax.pmean((mean, mean2), axis_name)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def _bn_apply(eps, x, mean, var, scale, bias):
    mul = jax.lax.rsqrt(var + eps) * scale
    return (x - mean) * mul + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _batch_norm_train(eps, axis_name, x, scale, bias):
    mean, var = _bn_stats(axis_name, x)
    return _bn_apply(eps, x, mean, var, scale, bias), mean, var


def _batch_norm_train_fwd(eps, axis_name, x, scale, bias):
    mean, var = _bn_stats(axis_name, x)
    y = _bn_apply(eps, x, mean, var, scale, bias)
    return (y, mean, var), (x, mean, var, scale, bias)


def _batch_norm_train_bwd(eps, axis_name, res, cts):
    # The statistics' cotangents are zero: they only feed the running averages,
    # behind a stop_gradient.
    x, mean, var, scale, bias = res
    dy = cts[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    rstd = jax.lax.rsqrt(var + eps)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    sum_dy, sum_dy_xhat = jnp.sum(dy, axes), jnp.sum(dy * xhat, axes)
    # scale and bias see this replica's rows only; x also reaches every
    # replica's output through the shared statistics.
    dscale, dbias = sum_dy_xhat, sum_dy
    count = np.prod([x.shape[a] for a in axes])
    if axis_name is not None:
        sum_dy, sum_dy_xhat = jax.lax.psum((sum_dy, sum_dy_xhat), axis_name)
        count = count * jax.lax.psum(1, axis_name)
    dx = (scale * rstd) * (dy - sum_dy / count - xhat * (sum_dy_xhat / count))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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

# XLA:CPU hands convolutions to its YNNPACK library by default. On this kind of
# CPU that runs a 3x3 convolution's backward pass 3x slower than XLA's older
# Eigen kernels (21.6 ms against 6.5 for 32->64 channels on 16x16, batch 64; the
# forward 3.9 against 2.1), so jft keeps YNNPACK for reductions only, where it is
# the faster one. Debug options set per compiled function, not process-wide.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The XLA options jft compiles its steps with on ``backend`` (default: JAX's default).

    On the CPU backend they route convolutions to XLA's Eigen kernels instead of
    YNNPACK, which trains jft's CNNs 1.5-3x faster there; on GPU and TPU there are
    none. :func:`jft.train.make_train_step` and the eval step use them; pass them
    to your own ``jax.jit`` of a model for the same speed:

    >>> import jax
    >>> step = jax.jit(lambda x: x + 1, compiler_options=compiler_options())
    >>> int(step(1))
    2
    """
    backend = backend or jax.default_backend()
    return dict(_CPU_COMPILER_OPTIONS) if backend == "cpu" else {}


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
    """``jax.lax.conv_general_dilated``, with faster formulations on the CPU backend.

    Pass it to ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``;
    parameters and values are unchanged. Off the CPU backend, and for dilated,
    grouped or non-NHWC convolutions, it is ``lax.conv_general_dilated``. On the
    CPU (timed on 2 cores, with :func:`compiler_options`):

    - A stride-1 convolution onto a map of at most 4×4 pixels is a sum of one
      matmul per kernel tap over the input rectangle the tap sees. XLA:CPU runs
      such convolutions up to 150× slower (ResNet-18's last stage at 64×64
      input, 512→512 on 2×2, batch 32: 290 ms forward against 1.8; forward and
      backward 5.3 ms against PyTorch's 11.3).
    - A strided convolution of 8 or more input channels keeps XLA's forward
      pass, but its input gradient and kernel gradient are per-tap matmuls
      (XLA's input gradient, a base-dilated convolution, took 62 ms for
      256→512 from 4×4, against 3.5). On an image's few channels (a ResNet
      stem) XLA's own is faster: 49 taps of 3-row matmuls took 17.6 ms against
      its 4.9.
    - Anything else is XLA's own convolution, which with
      :func:`compiler_options` is within 10% of PyTorch's oneDNN kernels
      forward and backward on this kind of CPU.
    """
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    nhwc = lhs.ndim == 4 and dimension_numbers == jax.lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, _NHWC
    )
    if jax.default_backend() == "cpu" and nhwc and not dilated and feature_group_count == 1:
        if not kwargs:
            pads = padding
            if isinstance(padding, str):
                pads = jax.lax.padtype_to_pads(
                    lhs.shape[1:3], rhs.shape[:2], window_strides, padding
                )
            pads = tuple(map(tuple, pads))
            strides = tuple(window_strides)
            if strides != (1, 1) and lhs.shape[3] >= 8:
                return _conv_cpu(strides, pads, precision, lhs, rhs)
            kh, kw = rhs.shape[:2]
            ho = lhs.shape[1] + pads[0][0] + pads[0][1] - kh + 1
            wo = lhs.shape[2] + pads[1][0] + pads[1][1] - kw + 1
            if kh * kw > 1 and ho * wo <= 16 and min(ho, wo) > 0:
                return _conv_taps(pads, precision, lhs, rhs)
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


def _conv_taps(pads, precision, x, w):
    # A stride-1 NHWC convolution as a sum over kernel taps: each tap multiplies
    # the rectangle of x it sees (padding excluded) by its C_in x C_out matrix, and
    # the product lands in its rectangle of the output. Plain ops, so autodiff
    # gives the backward pass in the same form.
    _, h, wd, _ = x.shape
    kh, kw, _, _ = w.shape
    (pt, pb), (pl, pr) = pads
    ho, wo = h + pt + pb - kh + 1, wd + pl + pr - kw + 1
    # Split, not indexed: the kernel's gradient is then one concatenation of the
    # taps' gradients rather than a sum of kh*kw zero-padded full-size kernels.
    taps = jnp.split(w.astype(x.dtype).reshape(kh * kw, *w.shape[2:]), kh * kw)
    out = None
    for i in range(kh):
        r0, r1 = max(0, pt - i), min(ho, h + pt - i)
        for j in range(kw):
            c0, c1 = max(0, pl - j), min(wo, wd + pl - j)
            if r0 >= r1 or c0 >= c1:
                continue
            xs = x[:, r0 + i - pt : r1 + i - pt, c0 + j - pl : c1 + j - pl, :]
            y = jnp.einsum("nhwc,co->nhwo", xs, taps[i * kw + j][0], precision=precision)
            y = jnp.pad(y, ((0, 0), (r0, ho - r1), (c0, wo - c1), (0, 0)))
            out = y if out is None else out + y
    if out is None:  # every tap falls in the padding
        out = jnp.zeros((x.shape[0], ho, wo, w.shape[3]), x.dtype)
    return out


def _conv_nhwc(strides, pads, precision, x, w):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_cpu(strides, pads, precision, x, w):
    # A strided NHWC convolution whose gradients are sums of per-tap matmuls (below).
    return _conv_nhwc(strides, pads, precision, x, w)


def _conv_cpu_fwd(strides, pads, precision, x, w):
    return _conv_nhwc(strides, pads, precision, x, w), (x, w)


def _conv_cpu_bwd(strides, pads, precision, res, g):
    # The kernel gradient as one (C_in x N*H*W) @ (N*H*W x C_out) matmul per kernel
    # tap over the strided input it sees.
    x, w = res
    kh, kw, ci, co = w.shape
    dx = _strided_conv_input_grad(strides, pads, precision, x.shape, w, g)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    gm = g.reshape(-1, co)
    taps = [
        jnp.matmul(xs.reshape(-1, ci).T, gm, precision=precision)
        for xs in _window_views((kh, kw), strides, xp)
    ]
    dw = jnp.stack(taps).reshape(kh, kw, ci, co).astype(w.dtype)
    return dx, dw


def _strided_conv_input_grad(strides, pads, precision, x_shape, w, g):
    # The input gradient of a strided convolution, which XLA:CPU runs as a
    # base-dilated convolution: 58 ms for ResNet-18's 256->512 stride-2 conv onto a
    # 2x2 map (batch 32), against 2 ms as one (g @ kernel tap^T) per tap, each
    # spread back onto the input grid with interior padding.
    kh, kw, _, _ = w.shape
    (pt, pb), (pl, pr) = pads
    h, wd = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    out = None
    for i in range(kh):
        for j in range(kw):
            c = jnp.matmul(g, w[i, j].T.astype(g.dtype), precision=precision)
            c = _spread(c, i, j, strides, (h, wd))
            out = c if out is None else out + c
    return out[:, pt : h - pb, pl : wd - pr, :]


def _window_views(window, strides, x):
    # The kh*kw strided views of x that a window's taps see, each (N, Ho, Wo, C),
    # in row-major tap order.
    (kh, kw), (sh, sw) = window, strides
    n, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    return [
        jax.lax.slice(
            x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _spread(d, i, j, strides, size):
    # The inverse of a window view: tap (i, j)'s (N, Ho, Wo, C) values put back
    # on an (N, *size, C) grid, zeros elsewhere, by interior padding.
    (sh, sw), (h, w) = strides, size
    _, ho, wo, _ = d.shape
    zero = jnp.zeros((), d.dtype)
    return jax.lax.pad(
        d,
        zero,
        (
            (0, 0, 0),
            (i, h - i - sh * (ho - 1) - 1, sh - 1),
            (j, w - j - sw * (wo - 1) - 1, sw - 1),
            (0, 0, 0),
        ),
    )


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def max_pool(
    x: jax.Array,
    window_shape: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``nn.max_pool`` on NHWC maps, with a backward pass XLA:CPU runs fast.

    The values are ``nn.max_pool``'s, and so is the gradient: it goes to the
    first maximum of each window in row-major order. XLA computes it with
    select-and-scatter, which XLA:CPU runs 5-20x slower than this (23 ms
    against 4 for a 2×2 pool of a 64×32×32×32 batch). Here the forward pass
    also keeps each window's argmax as an int8 tap index, as PyTorch does, and
    the backward pass is elementwise on it: for windows that tile the map, one
    pass in the map's own layout; otherwise one mask per tap, spread back with
    interior padding and summed. The small CNN's step went from 37 to 32 ms.
    """
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    return _max_pool(tuple(window_shape), tuple(strides), x)


def _max_pool_and_index(window, strides, x):
    # The maximum of each window and the position (row-major tap index) of its
    # first maximum; taps later in the window replace it only when greater.
    taps = _window_views(window, strides, x)
    out, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
    for k, t in enumerate(taps[1:], start=1):
        index = jnp.where(t > out, jnp.int8(k), index)
        out = jnp.maximum(out, t)
    return out, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _max_pool(window, strides, x):
    return _max_pool_and_index(window, strides, x)[0]


def _max_pool_fwd(window, strides, x):
    y, index = _max_pool_and_index(window, strides, x)
    return y, (index, x.shape)


def _max_pool_bwd(window, strides, res, g):
    # The gradient goes to each window's first maximum, as select-and-scatter
    # gives it, from the saved int8 positions alone.
    index, (n, h, w, c) = res
    (kh, kw), (sh, sw) = window, strides
    _, ho, wo, _ = g.shape
    zero = jnp.zeros((), g.dtype)
    if (kh, kw) == (sh, sw):
        # Windows tile the map: (N, Ho, kh, Wo, kw, C) is the map's own layout.
        taps = (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)[None, :]).astype(jnp.int8)
        hit = index[:, :, None, :, None, :] == taps[None, None, :, None, :, None]
        dx = jnp.where(hit, g[:, :, None, :, None, :], zero).reshape(n, ho * kh, wo * kw, c)
        return (jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0))),)
    dx = None
    for k in range(kh * kw):
        d = _spread(jnp.where(index == k, g, zero), *divmod(k, kw), strides, (h, w))
        dx = d if dx is None else dx + d
    return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
