"""A quantized frozen base under LoRA (QLoRA, Dettmers et al., 2023), through ``qwix``.

:func:`quantize_base` replaces the frozen kernels of a LoRA model's base with
their quantized values and scales, computed by Google's ``qwix``:

* ``int8``: symmetric absmax, one float32 scale per output feature (the
  kernel's last axis): 8 bits a weight.
* ``nf4``: QLoRA's 4-bit NormalFloat, absmax blocks of 64 weights along the
  kernel's first (input) axis, one float32 scale per block; two codes are packed
  in a byte, so 4.5 bits a weight. A kernel whose first axis is not a multiple of
  64 stays in its float dtype.

A quantized module holds ``kernel`` (``int8``, or ``uint8`` packed nf4 codes
with half the first axis) and ``kernel_scale``; the kind is read from the dtype,
so the tree describes itself. :class:`jft.peft.LoraModel` runs each such module
on its dequantized kernel, in the compute dtype (:func:`apply_quantized`): the
kernel is dequantized when its layer runs, and again in the backward pass,
instead of keeping a float copy of every kernel alive from the forward pass, so
the float weights exist a layer at a time. The adapters, the head and every
other trained parameter stay in float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft._paths import filter_leaves
from jft.peft.config import LoraError

__all__ = [
    "BLOCK",
    "QUANTIZE",
    "apply_quantized",
    "bits_per_weight",
    "dequantize",
    "is_quantized",
    "quantize",
    "quantize_base",
]

QUANTIZE = ("int8", "nf4")
"""The kinds of :func:`quantize_base`."""

BLOCK = 64
"""nf4's block: weights along the kernel's first axis that share one scale (as QLoRA)."""


def _qwix():
    try:
        import qwix
    except ImportError:  # pragma: no cover - qwix is a dependency of jft
        raise LoraError("lora.quantize needs the qwix package: pip install qwix") from None
    return qwix


def quantize(kernel: jax.Array, kind: str) -> dict[str, jax.Array] | None:
    """``{"kernel": codes, "kernel_scale": scales}`` of one float kernel; None if it stays float.

    Raises:
      LoraError: an unknown ``kind``.
    """
    if kind not in QUANTIZE:
        raise LoraError(f"lora.quantize={kind!r} is unknown; use one of {QUANTIZE} or ''")
    if kind == "nf4" and (jnp.ndim(kernel) < 2 or jnp.shape(kernel)[0] % BLOCK):
        return None
    codes, scale = _quantize(jnp.asarray(kernel), kind)
    return {"kernel": codes, "kernel_scale": scale}


@jax.jit(static_argnames="kind")
def _quantize(kernel: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    qwix = _qwix()
    w = kernel.astype(jnp.float32)
    if kind == "int8":
        q = qwix.quantize(w, jnp.int8, channelwise_axes=(w.ndim - 1,))
        return q.qvalue, q.scale
    q = qwix.quantize(w, "nf4", tiled_axes={0: BLOCK}, channelwise_axes=range(1, w.ndim))
    codes = q.qvalue.astype(jnp.uint8)
    return codes[0::2] | (codes[1::2] << 4), q.scale


def dequantize(codes: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel of ``quantize``'s codes and scales, in ``dtype``."""
    qwix = _qwix()
    if codes.dtype == jnp.int8:
        q = qwix.QArray(qvalue=codes, scale=scale, qtype=jnp.int8)
    else:  # packed nf4: low nibble even rows, high nibble odd rows
        low, high = codes & 0xF, codes >> 4
        unpacked = jnp.stack([low, high], axis=1).reshape(-1, *codes.shape[1:])
        q = qwix.QArray(qvalue=unpacked.astype(jnp.uint4), scale=scale, qtype="nf4")
    return qwix.dequantize(q).astype(dtype)


def _after(codes: jax.Array, x: jax.Array) -> jax.Array:
    """``codes`` again, as a new array that XLA can only compute once ``x`` exists.

    ``codes + 0``, with the 0 made from an element of ``x`` (a float times 0 may
    be NaN, so XLA cannot fold it; ``nan_to_num`` makes it 0 whatever ``x`` holds).
    A kernel dequantized from it is made when its layer runs, not hoisted to the
    start of the step, and XLA's CSE cannot merge it with another pass's copy.
    """
    zero = jnp.nan_to_num(x.reshape(-1)[0] * 0)
    return codes + zero.astype(codes.dtype)


def apply_quantized(module: nn.Module, x: jax.Array) -> jax.Array:
    """A module's output from its quantized kernel, dequantized anew in each pass.

    The forward pass dequantizes the kernel when the layer runs, and the backward
    pass dequantizes it again rather than keeping the forward's copy: no float
    kernel outlives its layer, where keeping them all for the backward pass would
    hold the whole base in float. (Neither ``jax.checkpoint`` nor an optimization
    barrier does this on XLA:CPU, which drops the barriers before its CSE pass;
    ``_after`` does, on every backend.)
    """
    plain = module.clone(parent=None)
    dtype = getattr(module, "dtype", None) or jnp.result_type(x, jnp.float32)

    def run(x, codes, scale, bias):
        params = {"kernel": dequantize(_after(codes, x), scale, dtype)}
        if bias is not None:
            params["bias"] = bias
        return plain.apply({"params": params}, x)

    @jax.custom_vjp
    def call(x, codes, scale, bias):
        return run(x, codes, scale, bias)

    def forward(x, codes, scale, bias):
        return run(x, codes, scale, bias), (x, codes, scale, bias)

    def backward(saved, dy):
        x, codes, scale, bias = saved
        codes = _after(codes, dy)  # not the forward pass's codes: dequantized again here
        _, vjp = jax.vjp(lambda x, bias: run(x, codes, scale, bias), x, bias)
        dx, dbias = vjp(dy)
        return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scale), dbias

    call.defvjp(forward, backward)
    get = lambda name: module.get_variable("params", name)
    return call(x, get("kernel"), get("kernel_scale"), get("bias"))


def is_quantized(module: Mapping[str, Any]) -> bool:
    """Whether one module's parameters hold a quantized kernel."""
    return "kernel_scale" in module and "kernel" in module


def _modules(tree: Mapping[str, Any], prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            path = f"{prefix}{k}"
            if "kernel" in v and not isinstance(v["kernel"], Mapping):
                yield path, v
            yield from _modules(v, f"{path}/")


def quantize_base(
    params: Mapping[str, Any], kind: str, *, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """``params`` with the base's kernels quantized (``int8`` or ``nf4``); adapters untouched.

    Every module whose parameters hold a ``kernel`` is quantized, except the
    modules whose paths a regex of ``skip`` fully matches (the trained head: a
    trained kernel must stay float). Quantizing is deterministic, so the same
    base gives the same tree, and its hash, on every load.

    Raises:
      LoraError: an unknown ``kind``, or a kernel that is already quantized.
    """
    patterns = [re.compile(s) for s in skip]
    out = filter_leaves(params, lambda _: True)  # a copy of the dicts, not the arrays
    for path, module in _modules(out):
        if any(p.fullmatch(path) or p.fullmatch(f"{path}/kernel") for p in patterns):
            continue
        if is_quantized(module):
            raise LoraError(f"{path}/kernel is quantized already; quantize a float base once")
        q = quantize(module["kernel"], kind)
        if q is not None:
            module.update(q)
    return out


def bits_per_weight(params: Mapping[str, Any]) -> float:
    """The stored bits per kernel weight of ``params``' kernels, scales included."""
    bits = weights = 0
    for _, module in _modules(params):
        kernel = module["kernel"]
        n = int(np.prod(kernel.shape)) * (2 if kernel.dtype == jnp.uint8 else 1)
        weights += n
        bits += 8 * (kernel.nbytes + (module["kernel_scale"].nbytes if is_quantized(module) else 0))
    return bits / max(weights, 1)
