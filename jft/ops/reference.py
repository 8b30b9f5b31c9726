"""The reference formulations: plain lax, what XLA runs on every backend but the CPU.

Each is the op jft's models would call without :mod:`jft.ops`:
``lax.conv_general_dilated``, ``nn.max_pool``'s ``lax.reduce_window`` and
``nn.BatchNorm``'s train-mode math, so a GPU or TPU program holds exactly XLA's
own convolutions, ``reduce_window`` and ``select_and_scatter``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "Padding2D",
    "Window2D",
    "batch_norm_apply",
    "batch_norm_stats",
    "batch_norm_train",
    "dense",
    "max_pool",
]

Window2D = tuple[int, int]  # (height, width) of a window or a stride
Padding2D = Sequence[tuple[int, int]]  # ((top, bottom), (left, right))


def dense(precision, preferred_element_type, x, w):
    """``nn.Dense``'s product: ``x``'s last axis contracted with ``w``'s first."""
    return jax.lax.dot_general(
        x,
        w,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def max_pool(
    x: jax.Array, window_shape: Window2D, strides: Window2D, padding: Padding2D
) -> jax.Array:
    """``nn.max_pool`` of an NHWC map: a max ``reduce_window``, padding with ``-inf``."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, *window_shape, 1),
        (1, *strides, 1),
        ((0, 0), *map(tuple, padding), (0, 0)),
    )


def batch_norm_stats(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """``nn.BatchNorm``'s float32 mean and (fast, biased) variance over all axes but the last."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean, mean2 = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)
    if axis_name is not None:
        mean, mean2 = jax.lax.pmean((mean, mean2), axis_name)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def batch_norm_apply(
    epsilon: float, x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """``nn.BatchNorm``'s normalization: ``(x - mean) * (rsqrt(var + eps) * scale) + bias``."""
    mul = jax.lax.rsqrt(var + epsilon) * scale
    return (x - mean) * mul + bias


def batch_norm_train(
    epsilon: float,
    axis_name: str | None,
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm: the output and the batch mean and variance, differentiated by JAX."""
    mean, var = batch_norm_stats(x, axis_name)
    return batch_norm_apply(epsilon, x, mean, var, scale, bias), mean, var
