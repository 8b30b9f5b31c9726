"""jft's formulations for the CPU backend, and the XLA:CPU compiler options.

XLA:CPU runs some of what convolutional models need far slower than the same
work written as other ops (the figures are in ``benchmarks/train_step.py`` and
the README's "How jft gets there on the CPU backend"). Each function here
equals its reference in :mod:`jft.ops.reference` in value and gradient; the
choice between the two is :mod:`jft.ops.kernels`'s, by the lowering platform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft.ops import reference

__all__ = [
    "YNN_OPTIONS",
    "batch_norm_train",
    "compiler_options",
    "conv",
    "dense",
    "max_pool",
    "optimization_barrier",
    "supported_options",
    "tap_index_dtype",
]

# XLA:CPU hands convolutions to its YNNPACK library by default, whose backward
# passes are several times slower on this kind of CPU than XLA's older Eigen
# kernels; jft keeps YNNPACK for reductions only, where it is the faster one.
YNN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def supported_options(options: dict[str, str]) -> dict[str, str]:
    """``options`` if this jaxlib's XLA:CPU compiles a trivial function with them, else ``{}``.

    Experimental options come and go between jaxlib releases; an unknown one
    fails every compilation, so it is tried once on its own.
    """
    x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(x).compile()
    except (RuntimeError, ValueError):  # jax.errors.JaxRuntimeError: "No such compile option"
        return {}
    return dict(options)


@functools.cache
def compiler_options() -> dict[str, str]:
    """The XLA:CPU options jft compiles its steps with (:data:`YNN_OPTIONS`, if supported)."""
    return supported_options(YNN_OPTIONS)


def optimization_barrier(x):
    """``lax.optimization_barrier``: XLA:CPU fuses no reduction over ``x`` into later passes.

    XLA:CPU fuses the train step's reductions over the gradients (the
    non-finite check, the norms) into the optimizer's elementwise passes,
    which makes those several times slower.
    """
    return jax.lax.optimization_barrier(x)


# --- Convolutions -------------------------------------------------------------

NHWC = ("NHWC", "HWIO", "NHWC")


def dense(precision, preferred_element_type, x, w):
    """A dense layer's product ``x @ w`` over ``x``'s last axis, as one 2-D product.

    XLA:CPU runs the backward pass of a ``(B, T, D) x (D, F)`` product with the
    cotangent transposed through memory for the weight gradient (fused into the
    activation's backward); flattened to ``(B*T, D) x (D, F)`` the weight gradient
    is one plain matrix product: a Llama MLP's gradient takes half the time
    (``benchmarks/decoder.py``). Each output is the same sum over ``D``.
    """
    y = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        w,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*x.shape[:-1], w.shape[-1])


def conv(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    precision: jax.lax.PrecisionLike = None,
) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """The CPU formulation ``f(x, w)`` of an NHWC/HWIO convolution, or None for XLA's own.

    The convolution is undilated and ungrouped, with these shapes, strides and
    padding. XLA:CPU is slow on two kinds, and fast enough on the rest:

    - A stride-1 convolution onto a map of at most 4×4 pixels (a deep stage of
      a ResNet): a sum of one matmul per kernel tap over the input rectangle
      the tap sees.
    - A strided convolution of 8 or more input channels keeps XLA's forward
      pass; its input and kernel gradients are per-tap matmuls (XLA's input
      gradient is a base-dilated convolution). On fewer channels (a ResNet
      stem over an image) XLA's own is faster.
    """
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding)
    pads = tuple(tuple(p) for p in padding)
    if any(p < 0 for pair in pads for p in pair):
        return None
    if strides != (1, 1):
        if lhs_shape[3] >= 8:
            return functools.partial(_conv_strided, strides, pads, precision)
        return None
    kh, kw = rhs_shape[:2]
    ho = lhs_shape[1] + pads[0][0] + pads[0][1] - kh + 1
    wo = lhs_shape[2] + pads[1][0] + pads[1][1] - kw + 1
    if kh * kw > 1 and ho * wo <= 16 and min(ho, wo) > 0:
        return functools.partial(_conv_taps, pads, precision)
    return None


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
        x, w, strides, pads, dimension_numbers=NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_strided(strides, pads, precision, x, w):
    # A strided NHWC convolution whose gradients are sums of per-tap matmuls (below).
    return _conv_nhwc(strides, pads, precision, x, w)


def _conv_strided_fwd(strides, pads, precision, x, w):
    return _conv_nhwc(strides, pads, precision, x, w), (x, w)


def _conv_strided_bwd(strides, pads, precision, res, g):
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
    return dx.astype(x.dtype), dw


_conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def _strided_conv_input_grad(strides, pads, precision, x_shape, w, g):
    # The input gradient of a strided convolution, which XLA:CPU runs as a slow
    # base-dilated convolution: here one (g @ kernel tap^T) per tap, each spread
    # back onto the input grid with interior padding.
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


# --- Max pooling --------------------------------------------------------------


def max_pool(
    x: jax.Array,
    window_shape: reference.Window2D,
    strides: reference.Window2D,
    padding: reference.Padding2D,
) -> jax.Array:
    """:func:`jft.ops.reference.max_pool` with a backward pass XLA:CPU runs fast.

    XLA computes the gradient with select-and-scatter, which XLA:CPU runs
    several times slower than this. Here the forward pass keeps each window's
    first argmax as a tap index, as PyTorch does, and the backward pass is
    elementwise on it: for windows that tile the map, one pass in the map's
    own layout; otherwise one mask per tap, spread back with interior padding
    and summed.
    """
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    return _max_pool(tuple(window_shape), tuple(strides), x)


def tap_index_dtype(taps: int) -> np.dtype:
    """The smallest signed integer type that numbers ``taps`` window positions."""
    for dtype in (np.int8, np.int16, np.int32):
        if taps <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _max_pool_and_index(window, strides, x):
    # The maximum of each window and the position (row-major tap index) of its
    # first maximum; taps later in the window replace it only when greater.
    taps = _window_views(window, strides, x)
    dtype = tap_index_dtype(len(taps))
    out, index = taps[0], jnp.zeros(taps[0].shape, dtype)
    for k, t in enumerate(taps[1:], start=1):
        index = jnp.where(t > out, jnp.asarray(k, dtype), index)
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
    # gives it, from the saved positions alone.
    index, (n, h, w, c) = res
    (kh, kw), (sh, sw) = window, strides
    _, ho, wo, _ = g.shape
    zero = jnp.zeros((), g.dtype)
    if (kh, kw) == (sh, sw):
        # Windows tile the map: (N, Ho, kh, Wo, kw, C) is the map's own layout.
        taps = (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)[None, :]).astype(index.dtype)
        hit = index[:, :, None, :, None, :] == taps[None, None, :, None, :, None]
        dx = jnp.where(hit, g[:, :, None, :, None, :], zero).reshape(n, ho * kh, wo * kw, c)
        return (jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0))),)
    dx = None
    for k in range(kh * kw):
        d = _spread(jnp.where(index == k, g, zero), *divmod(k, kw), strides, (h, w))
        dx = d if dx is None else dx + d
    return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- BatchNorm ----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def batch_norm_train(epsilon, axis_name, x, scale, bias):
    """:func:`jft.ops.reference.batch_norm_train` with its backward pass written out.

    Two per-channel sums and one elementwise pass; XLA:CPU runs autodiff of the
    forward as several more passes over the map.
    """
    return reference.batch_norm_train(epsilon, axis_name, x, scale, bias)


def _batch_norm_train_fwd(epsilon, axis_name, x, scale, bias):
    y, mean, var = reference.batch_norm_train(epsilon, axis_name, x, scale, bias)
    return (y, mean, var), (x, mean, var, scale, bias)


def _batch_norm_train_bwd(epsilon, axis_name, res, cts):
    # The statistics' cotangents are taken as zero: the caller uses them only
    # behind a stop_gradient (for the running averages).
    x, mean, var, scale, bias = res
    dy = cts[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    rstd = jax.lax.rsqrt(var + epsilon)
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


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
