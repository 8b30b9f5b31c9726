"""``jax.jit`` with jft's XLA options, usable inside other JAX transformations too."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jft.ops import compiler_options


class OptionsJit:
    """``jax.jit(fn, compiler_options=jft.ops.compiler_options(), ...)``.

    The options are chosen when the step is built, for JAX's default backend
    (``jax.jit`` takes them once; they cannot follow the lowering platform as
    :mod:`jft.ops`'s kernels do): XLA:CPU's on the CPU, none on GPU and TPU or
    with ``jft.ops.set_cpu_kernels(False)``.

    JAX accepts compiler options only on a top-level ``jax.jit``; called on
    tracers (under ``jax.make_jaxpr``, another ``jax.jit``, ``lax.scan``) this
    calls the same function jitted without them, so a step stays composable.
    Attributes (``lower``, ``trace``, ...) are the top-level jit's.
    """

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any) -> None:
        self._fast = jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)
        self._plain = jax.jit(fn, **jit_kwargs)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._plain(*args, **kwargs)
        return self._fast(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fast, name)
