"""Elementwise helpers shared by the rules."""

import jax
import jax.numpy as jnp


def abs_sq(x: jax.Array) -> jax.Array:
    """:math:`|x|^2 = x \\bar x` elementwise, real; ``x * x`` for a real ``x``.

    The second moments of Adam, AdaGrad and RMSProp use it, so that a complex
    gradient's moment is its squared modulus (as in optax), not ``g * g``, whose
    phase would turn the step.
    """
    if jnp.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x
