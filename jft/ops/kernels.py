"""The ops jft's models call: the CPU formulation when lowered for the CPU, else the reference.

Each takes the arguments of the op it replaces and equals it, in value and
gradient, on every platform (``tests/test_ops.py``). In a program lowered for
GPU or TPU (or a ``jax.export`` for one) only :mod:`jft.ops.reference` is
left; :func:`jft.ops.set_cpu_kernels` (or ``JFT_CPU_KERNELS=0``) gives the
reference on the CPU too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from jft.ops import cpu, reference
from jft.ops.switch import cpu_kernels_enabled, on_cpu

__all__ = [
    "batch_norm_train",
    "compiler_options",
    "conv_general_dilated",
    "dot_general",
    "max_pool",
    "optimization_barrier",
]


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
    """``jax.lax.conv_general_dilated``, with :func:`jft.ops.cpu.conv`'s formulations on the CPU.

    Pass it to ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``;
    parameters and values are unchanged. Dilated, grouped or non-NHWC
    convolutions, and any with further keyword arguments, are
    ``lax.conv_general_dilated`` on every platform.
    """
    reference_conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    nhwc = lhs.ndim == 4 and jax.lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers
    ) == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, cpu.NHWC)
    if not nhwc or dilated or feature_group_count != 1 or kwargs:
        return reference_conv(lhs, rhs)
    fast = cpu.conv(lhs.shape, rhs.shape, window_strides, padding, precision)
    if fast is None:
        return reference_conv(lhs, rhs)
    return on_cpu(fast, reference_conv, lhs, rhs)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
    """``jax.lax.dot_general``; a dense layer's product on the CPU is :func:`jft.ops.cpu.dense`'s.

    Pass it to ``nn.Dense(..., dot_general=dot_general)``; parameters and values
    are unchanged. Only the product ``nn.Dense`` makes of inputs with more than two
    axes (``lhs``'s last axis with a 2-D ``rhs``'s first, no batch axes) has a CPU
    formulation; any other product is ``lax.dot_general`` on every platform.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    dense = (
        lhs.ndim > 2
        and rhs.ndim == 2
        and tuple(lc) == (lhs.ndim - 1,)
        and tuple(rc) == (0,)
        and not (tuple(lb) or tuple(rb) or kwargs)
    )
    if not dense:
        return jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )
    args = (precision, preferred_element_type)
    return on_cpu(
        functools.partial(cpu.dense, *args), functools.partial(reference.dense, *args), lhs, rhs
    )


def max_pool(
    x: jax.Array,
    window_shape: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``nn.max_pool`` on NHWC maps; on the CPU with :func:`jft.ops.cpu.max_pool`'s backward pass.

    The gradient goes to the first maximum of each window in row-major order,
    as XLA's select-and-scatter gives it.
    """
    window_shape, strides = tuple(window_shape), tuple(strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], window_shape, strides, padding)
    padding = tuple(tuple(p) for p in padding)
    args = (window_shape, strides, padding)
    return on_cpu(lambda x: cpu.max_pool(x, *args), lambda x: reference.max_pool(x, *args), x)


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    epsilon: float,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``nn.BatchNorm``'s train mode over all axes but the last: ``(y, mean, variance)``.

    The statistics are float32, reduced over ``axis_name`` too when given, and
    carry no gradient (they feed the running averages). On the CPU the backward
    pass is :func:`jft.ops.cpu.batch_norm_train`'s.
    """

    def stopped(fn):
        def run(x, scale, bias):
            y, mean, var = fn(epsilon, axis_name, x, scale, bias)
            return (y, *jax.lax.stop_gradient((mean, var)))

        return run

    return on_cpu(
        stopped(cpu.batch_norm_train), stopped(reference.batch_norm_train), x, scale, bias
    )


def optimization_barrier(x):
    """:func:`jft.ops.cpu.optimization_barrier` in programs for the CPU, the identity elsewhere."""
    return on_cpu(cpu.optimization_barrier, lambda x: x, x)


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The XLA options jft compiles its steps with on ``backend`` (default: JAX's default).

    On the CPU backend they route convolutions to XLA's Eigen kernels instead of
    YNNPACK (:data:`jft.ops.cpu.YNN_OPTIONS`, if this jaxlib knows them); on GPU
    and TPU, or with the CPU kernels switched off, there are none.
    :func:`jft.train.make_train_step` and the eval step use them; pass them to
    your own ``jax.jit`` of a model for the same speed:

    >>> import jax
    >>> step = jax.jit(lambda x: x + 1, compiler_options=compiler_options())
    >>> int(step(1))
    2

    Unlike the ops, they cannot follow the platform being lowered for:
    ``jax.jit`` takes them once, so they are chosen for ``backend`` when the
    step is built. They change how XLA:CPU runs a program, not its ops: an
    export for another platform holds the same program either way.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not cpu_kernels_enabled():
        return {}
    return dict(cpu.compiler_options())
