"""Merge adapters into their kernels, and take them out again, in float32.

LoRA: :math:`W' = W + s A B`. DoRA: :math:`W' = (m / n) (W + s A B)` with
:math:`n = \\lVert W + s A B \\rVert` per output feature. The sums and products
run in float32 at the highest matmul precision whatever the parameters' dtype,
and the result is cast back to the kernel's dtype, so a merged model computes
what the adapter model computes (to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jft.peft.config import ADAPTER_LEAVES, LoraConfig, LoraError
from jft.peft.quant import dequantize, is_quantized

__all__ = ["delta", "merge", "reset_magnitudes", "unmerge"]

_NORM = "lora_weight_norm"  # DoRA's n, kept by merge(keep_adapters=True) for unmerge


def _fan_in(module: Mapping[str, Any]) -> int:
    return int(module["lora_A"].size // module["lora_A"].shape[-1])


def _kernel(module: Mapping[str, Any]) -> jax.Array:
    """The module's kernel in float32, dequantized if it is quantized (:mod:`jft.peft.quant`)."""
    if is_quantized(module):
        return dequantize(module["kernel"], module["kernel_scale"])
    return jnp.asarray(module["kernel"], jnp.float32)


def _dtype(module: Mapping[str, Any]) -> Any:
    """The dtype of a merged kernel: the kernel's own, float32 for a quantized one."""
    return jnp.float32 if is_quantized(module) else jnp.result_type(module["kernel"])


def _matrices(module: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """The kernel as a float32 ``(fan_in, out)`` matrix, :math:`A`, :math:`B` in float32, and
    the kernel's own shape (a quantized kernel is dequantized once, here)."""
    kernel = _kernel(module)
    fan_in = _fan_in(module)
    a = jnp.asarray(module["lora_A"], jnp.float32).reshape(fan_in, -1)
    b = jnp.asarray(module["lora_B"], jnp.float32)
    if kernel.size != fan_in * b.shape[-1]:
        raise LoraError(
            f"lora_A {tuple(module['lora_A'].shape)} and lora_B {tuple(b.shape)} do not fit "
            f"kernel {tuple(kernel.shape)}; the adapter belongs to another model"
        )
    return kernel.reshape(fan_in, -1), a, b, kernel.shape


def _product(a: jax.Array, b: jax.Array, config: LoraConfig) -> jax.Array:
    return config.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def delta(module: Mapping[str, Any], config: LoraConfig) -> jax.Array:
    """:math:`s A B` of one adapted module's parameters, float32, shaped as its kernel."""
    _, a, b, shape = _matrices(module)
    return _product(a, b, config).reshape(shape)


def _walk(tree: Mapping[str, Any], fn, *, dequantize_rest: bool = False) -> dict[str, Any]:
    """``fn`` on each adapted module; with ``dequantize_rest``, each quantized module
    without an adapter is dequantized (a merged tree is a float model's)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and "lora_A" in value:
            out[key] = fn(value)
        elif isinstance(value, Mapping) and dequantize_rest and is_quantized(value):
            out[key] = {k: v for k, v in value.items() if k != "kernel_scale"}
            out[key]["kernel"] = _kernel(value)
        elif isinstance(value, Mapping):
            out[key] = _walk(value, fn, dequantize_rest=dequantize_rest)
        else:
            out[key] = value
    return out


def merge(
    params: Mapping[str, Any], config: LoraConfig, *, keep_adapters: bool = False
) -> dict[str, Any]:
    """The base model's parameters with each adapter merged into its kernel.

    A quantized kernel (:func:`jft.peft.quantize_base`) is dequantized first: its
    merged kernel is float32, the dequantized base plus the adapter.

    Args:
      params: parameters with adapters (as :func:`jft.peft.init_adapters` returns).
      config: the adapters' :class:`~jft.peft.LoraConfig`.
      keep_adapters: keep the adapter parameters (and DoRA's norms) next to the
        merged kernels, so that :func:`unmerge` can restore the base exactly.

    Returns:
      A new tree for the *base* model (not the :class:`~jft.peft.LoraModel`);
      ``params`` is not modified.
    """

    def merge_one(module: Mapping[str, Any]) -> dict[str, Any]:
        w, a, b, shape = _matrices(module)
        v = w + _product(a, b, config)
        dropped = (*ADAPTER_LEAVES, "kernel_scale")
        out = {k: v_ for k, v_ in module.items() if k not in dropped}
        if config.use_dora:
            norm = jnp.linalg.norm(v, axis=0)
            v = v * (jnp.asarray(module["lora_magnitude"], jnp.float32) / norm)
            if keep_adapters:
                out[_NORM] = norm
        out["kernel"] = v.reshape(shape).astype(_dtype(module))
        if keep_adapters:
            out.update({k: module[k] for k in ADAPTER_LEAVES if k in module})
        return out

    return _walk(params, merge_one, dequantize_rest=True)


def unmerge(merged: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """The base parameters (with their adapters) from ``merge(..., keep_adapters=True)``.

    LoRA: :math:`W = W' - s A B`; DoRA: :math:`W = W' n / m - s A B`, with the
    norms :math:`n` that :func:`merge` kept.

    Raises:
      LoraError: a DoRA tree merged without ``keep_adapters`` (its norms are lost).
    """

    def unmerge_one(module: Mapping[str, Any]) -> dict[str, Any]:
        w, a, b, shape = _matrices(module)
        if config.use_dora:
            if _NORM not in module:
                raise LoraError(
                    "unmerge of DoRA needs the norms that merge(..., keep_adapters=True) keeps"
                )
            w = w * (module[_NORM] / jnp.asarray(module["lora_magnitude"], jnp.float32))
        w = w - _product(a, b, config)
        out = {k: v for k, v in module.items() if k not in (_NORM, "kernel_scale")}
        out["kernel"] = w.reshape(shape).astype(_dtype(module))
        return out

    return _walk(merged, unmerge_one, dequantize_rest=True)


def reset_magnitudes(params: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """``params`` with each DoRA magnitude set to :math:`\\lVert W + s A B \\rVert` (float32).

    That is DoRA's initial magnitude, with which the adapted model equals the
    base while :math:`B = 0`. Call it after loading new base weights into a tree
    whose adapters were initialised on other ones (a random init). Without DoRA,
    ``params`` is returned as it is.
    """
    if not config.use_dora:
        return dict(params)

    def reset(module: Mapping[str, Any]) -> dict[str, Any]:
        w, a, b, _ = _matrices(module)
        v = w + _product(a, b, config)
        return {**module, "lora_magnitude": jnp.linalg.norm(v, axis=0)}

    return _walk(params, reset)
