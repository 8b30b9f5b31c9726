"""RMSProp: v ← ρv + (1−ρ)g² ; θ ← θ − α g/(√v + ε), as torch.optim.RMSprop."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _validate


class RMSpropState(NamedTuple):
    """State of :func:`scale_by_rmsprop`, each entry shaped like params.

    ``nu`` is the mean square :math:`v`; ``grad_avg`` the mean gradient :math:`\\bar g`
    (``None`` unless ``centered``); ``momentum`` the buffer :math:`b` (``None`` when
    ``momentum`` is the number 0).
    """

    nu: optax.Updates
    grad_avg: optax.Updates | None
    momentum: optax.Updates | None


def scale_by_rmsprop(
    decay: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    momentum: jax.typing.ArrayLike = 0.0,
    *,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""Divides the gradient by the root of a moving mean of its square, as torch does.

    .. math::

        v \leftarrow \rho v + (1-\rho) g^2, \quad
        \bar g \leftarrow \rho \bar g + (1-\rho) g, \quad
        s = \sqrt{v} + \varepsilon \;\text{ or, centered, }\; s = \sqrt{v - \bar g^2} + \varepsilon

        u = g / s \;\text{ or, with momentum }\mu,\; b \leftarrow \mu b + g / s, \; u = b

    Args:
      decay: :math:`\rho` in [0, 1) (torch's ``alpha``).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      momentum: :math:`\mu` in [0, 1). Given as the number 0, no buffer is kept.
      centered: keyword-only; divide by the estimated standard deviation.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`RMSpropState`.
    """
    _validate.unit_interval(decay, "decay")
    _validate.nonnegative(eps, "eps")
    _validate.unit_interval(momentum, "momentum")
    # A structural choice on a concrete constant, as torch's `if momentum > 0`:
    # a traced momentum (inject_hyperparams) always keeps the buffer.
    use_momentum = not _validate.is_zero(momentum)

    def init_fn(params):
        return RMSpropState(
            nu=optax.tree.zeros_like(params),
            grad_avg=optax.tree.zeros_like(params) if centered else None,
            momentum=optax.tree.zeros_like(params) if use_momentum else None,
        )

    def update_fn(updates, state, params=None):
        del params
        nu = jax.tree.map(lambda g, v: decay * v + (1 - decay) * g * g, updates, state.nu)
        if centered:
            grad_avg = jax.tree.map(
                lambda g, a: decay * a + (1 - decay) * g, updates, state.grad_avg
            )
            denom = jax.tree.map(lambda v, a: jnp.sqrt(v - a * a) + eps, nu, grad_avg)
        else:
            grad_avg = None
            denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, nu)
        if use_momentum:
            buf = jax.tree.map(lambda g, s, b: momentum * b + g / s, updates, denom, state.momentum)
            updates = buf
        else:
            buf = None
            updates = jax.tree.map(lambda g, s: g / s, updates, denom)
        return updates, RMSpropState(nu=nu, grad_avg=grad_avg, momentum=buf)

    return optax.GradientTransformation(init_fn, update_fn)


def rmsprop(
    lr: optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    momentum: jax.typing.ArrayLike = 0.0,
    *,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""RMSProp: steps scaled by a moving root mean square of the gradients.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`v` the
    moving mean of :math:`g^2` (:math:`v_0 = 0`), :math:`\rho` its decay,
    :math:`\alpha` the learning rate, :math:`\varepsilon` a small constant; all
    operations are elementwise.

    .. math::

        v \leftarrow \rho v + (1 - \rho) g^2 \; ; \quad
        \theta \leftarrow \theta - \alpha \, g / (\sqrt{v} + \varepsilon)

    With ``centered=True`` the denominator is :math:`\sqrt{v - \bar g^2} + \varepsilon`,
    :math:`\bar g \leftarrow \rho \bar g + (1 - \rho) g`; with ``momentum`` :math:`\mu`
    the step goes through a buffer, :math:`b \leftarrow \mu b + g/(\cdot)`,
    :math:`\theta \leftarrow \theta - \alpha b` (see :func:`scale_by_rmsprop`).

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      decay: :math:`\rho` in [0, 1) (torch's ``alpha``).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      momentum: :math:`\mu` in [0, 1).
      centered: keyword-only; divide by the estimated standard deviation.

    Returns:
      An ``optax.GradientTransformation``:
      ``optax.chain(scale_by_rmsprop(...), optax.scale_by_learning_rate(lr))``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.rmsprop(0.01, decay=0.75, eps=0.0)
      >>> updates, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
      >>> updates  # -0.01 * 2 / sqrt(0.25 * 4)
      Array([-0.02], dtype=float32)

    References:
      Tieleman and Hinton, *Lecture 6.5, RMSProp*, COURSERA: Neural Networks for
      Machine Learning, 2012. Graves, *Generating sequences with recurrent
      neural networks*, 2013 (the centered form).

    Note:
      Equals ``torch.optim.RMSprop(lr=lr, alpha=decay, eps=eps, momentum=momentum,
      centered=centered)``: no bias correction, :math:`\varepsilon` outside the square
      root. ``optax.rmsprop`` defaults to ``decay=0.9`` and :math:`\varepsilon` inside
      the root; ``optax.rmsprop(lr, decay, eps, eps_in_sqrt=False, centered=...,
      momentum=...)`` gives the same updates as this function.
    """
    _validate.learning_rate(lr)
    return optax.chain(
        scale_by_rmsprop(decay, eps, momentum, centered=centered),
        optax.scale_by_learning_rate(lr),
    )
