"""Backend-specific kernels behind one switch (the CPU's today).

jft's models call :func:`conv_general_dilated`, :func:`dot_general`, :func:`max_pool` and
:func:`batch_norm_train`, and its train step :func:`optimization_barrier`.
Each is chosen by the platform the program is lowered for
(``jax.lax.platform_dependent``): on the CPU a formulation XLA:CPU runs faster
(:mod:`jft.ops.cpu`), everywhere else plain lax (:mod:`jft.ops.reference`),
so GPU and TPU programs hold only XLA's own ops. Values and gradients are the
same either way.

One switch turns the CPU formulations and :func:`compiler_options` off:
``JFT_CPU_KERNELS=0`` in the environment, :func:`set_cpu_kernels`, or the
:func:`cpu_kernels` context manager. This package imports nothing of jft but
the error base class.
"""

from jft.ops import cpu, reference
from jft.ops.kernels import (
    batch_norm_train,
    compiler_options,
    conv_general_dilated,
    dot_general,
    max_pool,
    optimization_barrier,
)
from jft.ops.switch import (
    KernelSwitchError,
    cpu_kernels,
    cpu_kernels_enabled,
    set_cpu_kernels,
)

__all__ = [
    "KernelSwitchError",
    "batch_norm_train",
    "compiler_options",
    "conv_general_dilated",
    "cpu",
    "cpu_kernels",
    "cpu_kernels_enabled",
    "dot_general",
    "max_pool",
    "optimization_barrier",
    "reference",
    "set_cpu_kernels",
]
