"""Subgradient method: θ ← θ − α_t g_t, g_t ∈ ∂L(θ_t), α_t = α/√(t+1)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["SubgradientState", "scale_by_subgradient", "subgradient"]


class SubgradientState(NamedTuple):
    """State of :func:`scale_by_subgradient`: the step count ``t`` (int32, from 0)."""

    count: jax.Array


def scale_by_subgradient() -> optax.GradientTransformationExtraArgs:
    r"""Scales the :math:`t`-th (sub)gradient by :math:`1/\sqrt{t+1}`, :math:`t = 0, 1, \ldots`

    .. math::

        u_t = g_t / \sqrt{t + 1}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SubgradientState`.
    """

    def init_fn(params):
        _validate.parameters(params, "scale_by_subgradient")
        return SubgradientState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args

        def f(g):
            # One scalar 1/√(t+1), in g's real precision (at least float32), then
            # one multiply per entry: a division per entry costs a second pass's time.
            real = jnp.promote_types(jnp.finfo(g.dtype).dtype, jnp.float32)
            factor = 1 / jnp.sqrt(jnp.asarray(state.count + 1, real))
            return (g * factor).astype(g.dtype)

        return jax.tree.map(f, updates), SubgradientState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def subgradient(lr: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""The subgradient method with diminishing steps, for non-differentiable losses.

    Symbols: :math:`\theta_t` the parameters at step :math:`t` (counted from 0),
    :math:`g_t \in \partial L(\theta_t)` a subgradient of the loss (L1, hinge,
    ReLU networks), :math:`\alpha` the base learning rate (``lr``).

    .. math::

        \theta \leftarrow \theta - \alpha_t g_t, \qquad
        \alpha_t = \alpha / \sqrt{t + 1}, \quad t = 0, 1, \ldots

    With a schedule, :math:`\alpha` is ``lr(t)``, so :math:`\alpha_t = \text{lr}(t)/\sqrt{t+1}`.

    Which subgradient ``jax.grad`` returns at a kink (checked on jax 0.10):
    ``jax.grad(jnp.abs)(0.)`` is ``1.0`` (not 0: the L1 loss keeps pushing a zero
    parameter, which the shrinking step size makes harmless);
    ``jax.grad(jax.nn.relu)(0.)`` is ``0.0``; ``jnp.maximum`` and ``jnp.minimum``
    split a tie, so ``jax.grad(lambda x: jnp.maximum(x, 0.))(0.)`` is ``0.5`` and
    the hinge ``max(0, 1 - x)`` has gradient ``-0.5`` at ``x = 1``. All of these
    lie in the subdifferential. ``jnp.linalg.norm`` at 0 gives NaN: write
    ``jnp.sum(jnp.abs(x))`` or use a safe norm.

    Args:
      lr: base learning rate :math:`\alpha` (``>= 0``), or an optax schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_subgradient(), scale_by_learning_rate(lr))``.

    Example:
      >>> import jax, jax.numpy as jnp, jft
      >>> tx = jft.optim.subgradient(1.0)
      >>> state = tx.init(jnp.zeros(1))
      >>> g = jax.grad(lambda x: jnp.abs(x).sum())(jnp.array([-2.0]))
      >>> for _ in range(4):
      ...     updates, state = tx.update(g, state)
      >>> updates  # 1 / sqrt(4)
      Array([0.5], dtype=float32)

    References:
      Shor, *Minimization methods for non-differentiable functions*, 1985.
      Boyd, Xiao and Mutapcic, *Subgradient methods*, Stanford EE392o notes, 2003.

    Note:
      The same steps come from ``optax.sgd(lambda t: lr / jnp.sqrt(t + 1))``.
      torch has no such rule (``torch.optim.SGD`` with a ``LambdaLR`` scheduler).
      Complex parameters: the rule is linear in :math:`g`, so it applies as it
      stands, as in optax and ``torch.optim.SGD`` (pass the conjugate of
      ``jax.grad``'s gradient, as optax does).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_subgradient(), scale_by_learning_rate(lr)), "subgradient"
    )
