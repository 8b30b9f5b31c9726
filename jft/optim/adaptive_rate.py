"""Elementwise adaptive rate: θ ← θ − α g / (1 + β g), with a guard near 1 + βg = 0."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft.optim import _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["adaptive_rate", "scale_by_adaptive_rate"]

_COMPLEX_REASON = (
    "g/(1 + beta*g) would turn a complex step off the gradient's direction: "
    "optimize the real and imaginary parts as real parameters"
)


def scale_by_adaptive_rate(
    beta: jax.typing.ArrayLike, *, eps: jax.typing.ArrayLike = 1e-6
) -> optax.GradientTransformationExtraArgs:
    r"""Divides each gradient entry by :math:`1 + \beta g`, guarded away from zero.

    .. math::

        u = g / d, \qquad
        d = \begin{cases} 1 + \beta g & |1 + \beta g| \ge \varepsilon \\
        \varepsilon \operatorname{sign}^+(1 + \beta g) & \text{otherwise} \end{cases}

    where :math:`\operatorname{sign}^+` is the sign with :math:`\operatorname{sign}^+(0) = +1`;
    :math:`u` is then clipped to the dtype's finite range (it matters for float16).

    Args:
      beta: :math:`\beta` (finite, ``>= 0``).
      eps: keyword-only; smallest magnitude :math:`\varepsilon > 0` of the
        denominator, so that :math:`|u| \le |g| / \varepsilon`.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs`` (state ``optax.EmptyState``);
      its ``init`` refuses complex parameters (see :func:`adaptive_rate`).
    """
    _validate.nonnegative(beta, "beta")
    _validate.nonnegative(eps, "eps")

    def init_fn(params):
        _validate.parameters(params, "scale_by_adaptive_rate", complex_reason=_COMPLEX_REASON)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args

        def f(g):
            d = 1 + beta * g
            guard = jnp.where(d < 0, -eps, eps).astype(g.dtype)
            d = jnp.where(jnp.abs(d) < eps, guard, d)
            # |g|/eps can still overflow a narrow dtype (float16 stops at 65504).
            big = jnp.finfo(g.dtype).max
            return jnp.clip(g / d, -big, big).astype(g.dtype)

        return jax.tree.map(f, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adaptive_rate(
    lr: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike,
    *,
    eps: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient descent whose step shrinks, entry by entry, where :math:`\beta g` is large.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`\alpha`
    the learning rate, :math:`\beta` the rate coefficient; all operations are
    elementwise.

    .. math::

        \theta \leftarrow \theta - \alpha \, g / (1 + \beta g)

    Guard: where :math:`|1 + \beta g| < \varepsilon` (``eps``, default 1e-6) the
    denominator is replaced by :math:`\pm\varepsilon` (its sign, ``+`` at exactly 0,
    e.g. :math:`\beta g = -1`), so every update is finite, at most
    :math:`\alpha |g| / \varepsilon` in magnitude (and, before the learning rate,
    within the dtype's finite range). Elsewhere the formula is exact,
    including for :math:`\beta g < -1`, where the denominator is negative.

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      beta: rate coefficient :math:`\beta` (finite, ``>= 0``).
      eps: keyword-only; the guard :math:`\varepsilon` above.

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_adaptive_rate(beta, eps=eps), scale_by_learning_rate(lr))``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.adaptive_rate(0.5, beta=1.0)
      >>> updates, _ = tx.update(jnp.array([1.0, 3.0, -1.0]), tx.init(jnp.zeros(3)))
      >>> updates  # -0.5 * g / (1 + g); g = -1 hits the guard, 1/1e-6
      Array([-2.50e-01, -3.75e-01,  5.00e+05], dtype=float32)

    Note:
      Neither optax nor ``torch.optim`` has this rule. ``beta`` may be 1 or more
      (it is not an averaging coefficient), but must be finite and non-negative.
      Complex parameters are refused (``init`` raises
      ``jft.optim.ParameterDtypeError``): for a complex :math:`g` the denominator
      :math:`1 + \beta g` is complex, so it turns the step off the gradient's
      direction instead of shrinking it, and the guard's sign has no meaning.
      Optimize the real and imaginary parts as real parameters instead.
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_adaptive_rate(beta, eps=eps), scale_by_learning_rate(lr)),
        "adaptive_rate",
        complex_reason=_COMPLEX_REASON,
    )
