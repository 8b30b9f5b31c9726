"""The learning-rate step that ends every rule: u ← −α_t u, with α_t readable from the state."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft.optim import _validate


class _Static:
    """The learning rate (a number or a schedule) kept as static tree data.

    It takes no bytes of state, and every ``_Static`` equals every other, so the
    state's structure does not depend on the rate: under
    ``optax.inject_hyperparams`` the rate is traced and is not kept here.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static)

    def __hash__(self) -> int:
        return hash(_Static)


@jax.tree_util.register_pytree_with_keys_class
class LearningRateState:
    """State of :func:`scale_by_learning_rate`.

    ``count`` (int32) is the number of updates so far, the argument of a schedule
    (``None`` for a constant rate, which needs none). The rate itself is static
    data of the tree, so the state costs what ``optax.scale_by_learning_rate``'s
    does; :attr:`learning_rate` gives the rate of the last update, which
    ``jft.train`` reports as ``metrics["lr"]``.
    """

    def __init__(self, count: jax.Array | None, rate: Any = None):
        self.count = count
        self._rate = rate if isinstance(rate, _Static) else _Static(rate)

    @property
    def learning_rate(self) -> jax.Array | None:
        """:math:`\\alpha_t` of the last update (of the first before any); ``None`` when
        the rate was given as an array (``optax.inject_hyperparams`` keeps it)."""
        rate = self._rate.value
        if rate is None:
            return None
        if callable(rate):
            rate = rate(jnp.maximum(self.count - 1, 0))
        return jnp.real(jnp.asarray(rate)).astype(jnp.float32)

    def tree_flatten_with_keys(self):
        children = () if self.count is None else ((jax.tree_util.GetAttrKey("count"), self.count),)
        return children, self._rate

    @classmethod
    def tree_unflatten(cls, rate, children):
        return cls(children[0] if children else None, rate)

    def __repr__(self) -> str:
        return f"LearningRateState(count={self.count!r}, lr={self._rate.value!r})"


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
      The same updates and state size as ``optax.scale_by_learning_rate(lr)``
      (a count for a schedule, nothing for a constant); the difference is that
      the rate can be read from the state, so a train step can report it for
      any rule, chained or partitioned. A rate given as a ``jax.Array`` (as
      ``optax.inject_hyperparams`` gives it, keeping it in its own state) is not
      kept (``learning_rate`` is ``None``).
    """
    _validate.learning_rate(lr)
    # A number or a schedule rides in the state's tree structure; an array (as
    # optax.inject_hyperparams passes, which keeps the rate itself) does not.
    static = None if isinstance(lr, jax.Array) else lr

    def init_fn(params):
        _validate.parameters(params, "scale_by_learning_rate")
        return LearningRateState(jnp.zeros([], jnp.int32) if callable(lr) else None, static)

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        alpha = jnp.asarray(lr(state.count) if callable(lr) else lr)
        updates = jax.tree.map(lambda g: jnp.asarray(-alpha, g.dtype) * g, updates)
        count = optax.safe_increment(state.count) if callable(lr) else None
        return updates, LearningRateState(count, static)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
