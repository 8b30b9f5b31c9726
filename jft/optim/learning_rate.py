"""The learning-rate step that ends every rule: u ← −α_t u, with α_t readable from the state."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _validate

__all__ = ["LearningRateState", "scale_by_learning_rate"]


class LearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`.

    Attributes:
      count: int32, the number of updates so far (a schedule's argument).
      learning_rate: float32, :math:`\\alpha_t` of the last update (of the first
        before any), which ``jft.train`` reports as ``metrics["lr"]``.
    """

    count: jax.Array
    learning_rate: jax.Array


def _rate(lr: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return jnp.asarray(lr(count) if callable(lr) else lr)


def scale_by_learning_rate(lr: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies the updates by :math:`-\alpha_t`, the learning rate at step :math:`t`.

    .. math::

        u \leftarrow -\alpha_t \, u, \qquad
        \alpha_t = \text{lr}(t) \text{ for a schedule, else } \text{lr}, \quad t = 0, 1, \ldots

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule called
        with the count of updates so far.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`LearningRateState`.

    Example:
      >>> import jax.numpy as jnp, optax, jft
      >>> tx = jft.optim.scale_by_learning_rate(optax.linear_schedule(1.0, 0.0, 4))
      >>> state = tx.init(jnp.zeros(1))
      >>> updates, state = tx.update(jnp.ones(1), state)
      >>> updates, state = tx.update(jnp.ones(1), state)
      >>> updates, state.learning_rate
      (Array([-0.75], dtype=float32), Array(0.75, dtype=float32))

    Note:
      The same updates as ``optax.scale_by_learning_rate(lr)``; the state also
      holds the count and the rate of the last update (8 bytes), so a train
      step can report the rate of any rule, chained or partitioned, and the
      state has the same structure under ``optax.inject_hyperparams``.
    """
    _validate.learning_rate(lr)

    def init_fn(params):
        _validate.parameters(params, "scale_by_learning_rate")
        count = jnp.zeros([], jnp.int32)
        return LearningRateState(count, jnp.real(_rate(lr, count)).astype(jnp.float32))

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        alpha = _rate(lr, state.count)
        updates = jax.tree.map(lambda g: jnp.asarray(-alpha, g.dtype) * g, updates)
        rate = jnp.real(alpha).astype(jnp.float32)
        return updates, LearningRateState(optax.safe_increment(state.count), rate)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
