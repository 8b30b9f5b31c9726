"""The one switch for jft's CPU kernels, and the choice by the platform being lowered for.

The CPU formulations are on unless the environment variable ``JFT_CPU_KERNELS``
is ``0`` (or ``false``/``off``/``no``) or :func:`set_cpu_kernels` turns them
off. The switch is read when a function is traced (and, for the compiler
options, when a jft step is built): ``jax.jit`` caches what it traced, so set it
before the first call of a jitted function, or jit it anew.

With the switch on, :func:`on_cpu` still runs the CPU formulation only in
programs lowered for the CPU (``jax.lax.platform_dependent``): a program for
GPU or TPU, or a ``jax.export`` for one, holds only the reference ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

from jft.errors import JftError

__all__ = ["KernelSwitchError", "cpu_kernels", "cpu_kernels_enabled", "on_cpu", "set_cpu_kernels"]

ENV = "JFT_CPU_KERNELS"
_ON, _OFF = ("1", "true", "on", "yes", ""), ("0", "false", "off", "no")
_enabled: bool | None = None  # None: not read from the environment yet

T = TypeVar("T")


class KernelSwitchError(JftError, ValueError):
    """``JFT_CPU_KERNELS`` holds something other than on/off."""


def cpu_kernels_enabled() -> bool:
    """Whether jft's CPU formulations are on (``JFT_CPU_KERNELS``, default on).

    Raises:
      KernelSwitchError: ``JFT_CPU_KERNELS`` is not one of 1/0, true/false, on/off, yes/no.
    """
    global _enabled
    if _enabled is None:
        value = os.environ.get(ENV, "").strip().lower()
        if value not in _ON + _OFF:
            raise KernelSwitchError(
                f"environment variable {ENV}={os.environ[ENV]!r} is not a switch: "
                f"set it to 1 (jft's CPU kernels, the default) or 0 (XLA's own ops only)"
            )
        _enabled = value in _ON
    return _enabled


def set_cpu_kernels(enabled: bool) -> None:
    """Turns jft's CPU formulations (kernels, compiler options, barriers) on or off.

    Off, every platform runs the reference ops of :mod:`jft.ops.reference`. It
    overrides ``JFT_CPU_KERNELS`` and holds for functions traced afterwards.
    """
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """:func:`set_cpu_kernels` for the functions traced inside a ``with`` block.

    >>> import jft.ops
    >>> before = jft.ops.cpu_kernels_enabled()
    >>> with jft.ops.cpu_kernels(False):
    ...     jft.ops.cpu_kernels_enabled()
    False
    >>> jft.ops.cpu_kernels_enabled() == before
    True
    """
    before = cpu_kernels_enabled()
    set_cpu_kernels(enabled)
    try:
        yield
    finally:
        set_cpu_kernels(before)


def on_cpu(fast: Callable[..., T], reference: Callable[..., T], *args: Any) -> T:
    """``fast(*args)`` in programs lowered for the CPU, ``reference(*args)`` elsewhere.

    Both are traced (``jax.lax.platform_dependent``) and must return the same
    shapes; only the one for the lowering platform reaches XLA. With the switch
    off, only ``reference`` is traced.
    """
    if not cpu_kernels_enabled():
        return reference(*args)
    return jax.lax.platform_dependent(*args, cpu=fast, default=reference)
