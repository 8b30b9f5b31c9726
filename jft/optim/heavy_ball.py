"""Polyak's heavy ball: θ_{t+1} = θ_t − η g_t + α(θ_t − θ_{t−1}), as torch.optim.SGD(momentum)."""

from typing import Any, NamedTuple

import jax
import optax

from jft.optim import _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["HeavyBallState", "heavy_ball", "scale_by_heavy_ball"]


class HeavyBallState(NamedTuple):
    """State of :func:`scale_by_heavy_ball`: the momentum buffer ``b``, shaped like params."""

    momentum: optax.Updates


def scale_by_heavy_ball(
    momentum: jax.typing.ArrayLike = 0.9, *, nesterov: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates the gradient in a momentum buffer, as ``torch.optim.SGD`` does.

    .. math::

        b_t = \mu b_{t-1} + g_t, \quad b_0 = 0; \qquad
        u_t = b_t \;\text{ or, with Nesterov, }\; u_t = g_t + \mu b_t

    Args:
      momentum: momentum coefficient :math:`\mu` in [0, 1).
      nesterov: use Nesterov's look-ahead form.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state, a
      :class:`HeavyBallState`, holds the buffer :math:`b`.
    """
    _validate.unit_interval(momentum, "momentum")

    def init_fn(params):
        _validate.parameters(params, "scale_by_heavy_ball")
        return HeavyBallState(optax.tree.zeros_like(params))  # b_0 = 0

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        buf = jax.tree.map(lambda g, b: momentum * b + g, updates, state.momentum)
        if nesterov:
            updates = jax.tree.map(lambda g, b: g + momentum * b, updates, buf)
        else:
            updates = buf
        return updates, HeavyBallState(momentum=buf)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def heavy_ball(
    lr: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike = 0.9,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Polyak's heavy-ball method, equal to ``torch.optim.SGD(lr, momentum)``.

    Symbols: :math:`\theta_t` the parameters after :math:`t` steps, :math:`g_t`
    the gradient at :math:`\theta_t`, :math:`\eta` the learning rate (``lr``),
    :math:`\alpha = \mu` the momentum coefficient (``momentum``), :math:`b` the
    momentum buffer of ``torch.optim.SGD`` (dampening 0).

    .. math::

        \theta_{t+1} = \theta_t - \eta g_t + \alpha (\theta_t - \theta_{t-1})

    It is computed as torch does: :math:`b_t = \mu b_{t-1} + g_t` (:math:`b_0 = 0`),
    :math:`\theta_{t+1} = \theta_t - \eta b_t`. The two are the same: with a
    constant :math:`\eta`, :math:`\theta_t - \theta_{t-1} = -\eta b_{t-1}`, so
    :math:`-\eta b_t = -\eta g_t - \eta \mu b_{t-1} = -\eta g_t + \mu(\theta_t - \theta_{t-1})`,
    i.e. :math:`\alpha = \mu`. With ``nesterov=True`` the step is
    :math:`-\eta (g_t + \mu b_t)`, as in torch.

    Args:
      lr: learning rate :math:`\eta` (``>= 0``), or an optax schedule.
      momentum: momentum coefficient :math:`\alpha = \mu` in [0, 1).
      nesterov: keyword-only; Nesterov momentum as in ``torch.optim.SGD``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_heavy_ball(momentum), scale_by_learning_rate(lr))``.

    Example: three steps on a constant gradient, in the :math:`\theta` form
    (:math:`\theta_3 = \theta_2 - g + \tfrac12(\theta_2 - \theta_1) = -2.5 - 1 - 0.75`):

      >>> import jax.numpy as jnp, optax, jft
      >>> theta, tx = jnp.zeros(1), jft.optim.heavy_ball(1.0, momentum=0.5)
      >>> state = tx.init(theta)
      >>> for _ in range(3):  # b = 1, 1.5, 1.75
      ...     updates, state = tx.update(jnp.ones(1), state)
      ...     theta = optax.apply_updates(theta, updates)
      >>> theta
      Array([-4.25], dtype=float32)

    References:
      Polyak, *Some methods of speeding up the convergence of iteration
      methods*, 1964. Sutskever et al., *On the importance of initialization and
      momentum in deep learning*, ICML 2013 (the Nesterov form).

    Note:
      Equals ``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=nesterov)`` and
      ``optax.sgd(lr, momentum, nesterov=nesterov)``. With a schedule, the step
      is :math:`-\eta_t b_t` (as torch with an ``lr_scheduler``), so the
      :math:`\theta` form above holds with :math:`\alpha = \mu\eta_t/\eta_{t-1}`.
      Complex parameters: the rule is linear in :math:`g`, so it applies as it
      stands, as in optax and ``torch.optim.SGD`` (pass the conjugate of
      ``jax.grad``'s gradient, as optax does).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_heavy_ball(momentum, nesterov=nesterov), scale_by_learning_rate(lr)),
        "heavy_ball",
    )
