"""Momentum as an exponential moving average of gradients: v ← βv + (1−β)g ; θ ← θ − αv."""

from typing import Any, NamedTuple

import jax
import optax

from jft.optim import _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["MomentumState", "momentum", "scale_by_momentum"]


class MomentumState(NamedTuple):
    """State of :func:`scale_by_momentum`: the velocity ``v``, shaped like params."""

    velocity: optax.Updates


def scale_by_momentum(beta: jax.typing.ArrayLike = 0.9) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient with its exponential moving average ``v``.

    .. math::

        v \leftarrow \beta v + (1 - \beta) g, \qquad v_0 = 0

    Args:
      beta: averaging coefficient :math:`\beta` in [0, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MomentumState`.
    """
    _validate.unit_interval(beta, "beta")

    def init_fn(params):
        _validate.parameters(params, "scale_by_momentum")
        return MomentumState(velocity=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        velocity = jax.tree.map(lambda g, v: beta * v + (1 - beta) * g, updates, state.velocity)
        return velocity, MomentumState(velocity=velocity)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum(
    lr: optax.ScalarOrSchedule, beta: jax.typing.ArrayLike = 0.9
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient descent along an exponential moving average of the gradients.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`v` the
    velocity (zero at start), :math:`\beta` the averaging coefficient,
    :math:`\alpha` the learning rate.

    .. math::

        v \leftarrow \beta v + (1 - \beta) g \; ; \quad
        \theta \leftarrow \theta - \alpha v \qquad (v_0 = 0)

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      beta: averaging coefficient :math:`\beta` in [0, 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_momentum(beta), scale_by_learning_rate(lr))``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.momentum(1.0, beta=0.5)
      >>> state = tx.init(jnp.zeros(1))
      >>> updates, state = tx.update(jnp.ones(1), state)  # v = 0.5
      >>> updates, state = tx.update(jnp.ones(1), state)  # v = 0.75
      >>> updates
      Array([-0.75], dtype=float32)

    References:
      Polyak, *Some methods of speeding up the convergence of iteration
      methods*, 1964 (the heavy-ball method, of which this is the damped form).

    Note:
      The gradient is damped by :math:`1 - \beta`, so the steady-state step is
      :math:`\alpha g`, not :math:`\alpha g / (1 - \beta)` as in
      :func:`jft.optim.heavy_ball`, ``optax.sgd(momentum=...)`` and
      ``torch.optim.SGD(momentum=...)``. It equals
      ``optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(lr))``.
      ``torch.optim.SGD(momentum=beta, dampening=beta)`` differs at the first
      step, where torch sets :math:`v_1 = g_1` without damping.
      Complex parameters: the rule is linear in :math:`g`, so it applies as it
      stands, as in optax and ``torch.optim.SGD`` (pass the conjugate of
      ``jax.grad``'s gradient, as optax does).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_momentum(beta), scale_by_learning_rate(lr)), "momentum"
    )
