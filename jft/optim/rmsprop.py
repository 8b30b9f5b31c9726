"""RMSProp: v ← ρv + (1−ρ)g² ; θ ← θ − α g/(√v + ε), as torch.optim.RMSprop."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _numerics, _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["RMSpropState", "rmsprop", "scale_by_rmsprop"]


class RMSpropState(NamedTuple):
    """State of :func:`scale_by_rmsprop`, each entry shaped like params.

    ``nu`` is the mean square :math:`v`; ``grad_avg`` the mean gradient :math:`\\bar g`
    (``None`` unless ``centered``); ``momentum`` the buffer :math:`b` (``None`` when
    ``momentum`` is ``None``).
    """

    nu: optax.Updates
    grad_avg: optax.Updates | None
    momentum: optax.Updates | None


def scale_by_rmsprop(
    decay: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    momentum: jax.typing.ArrayLike | None = None,
    *,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Divides the gradient by the root of a moving mean of its square, as torch does.

    .. math::

        v \leftarrow \rho v + (1-\rho) |g|^2, \quad
        \bar g \leftarrow \rho \bar g + (1-\rho) g, \quad
        s = \sqrt{v} + \varepsilon \;\text{ or, centered, }\;
        s = \sqrt{v - |\bar g|^2} + \varepsilon

        u = g / s \;\text{ or, with momentum }\mu,\; b \leftarrow \mu b + g / s, \; u = b

    Args:
      decay: :math:`\rho` in [0, 1) (torch's ``alpha``).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      momentum: :math:`\mu` in [0, 1), or ``None`` (the default): no buffer is
        kept. A number, 0 included, keeps one, so that the state has the same
        structure under ``optax.inject_hyperparams`` (where ``None`` stays static).
      centered: keyword-only; divide by the estimated standard deviation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`RMSpropState`.
    """
    _validate.unit_interval(decay, "decay")
    _validate.nonnegative(eps, "eps")
    _validate.unit_interval(momentum, "momentum")
    # A structural choice on None, which inject_hyperparams keeps static: a
    # number (traced there) always keeps the buffer, plain or injected.
    use_momentum = momentum is not None

    def init_fn(params):
        _validate.parameters(params, "scale_by_rmsprop")
        return RMSpropState(
            nu=optax.tree.zeros_like(params),
            grad_avg=optax.tree.zeros_like(params) if centered else None,
            momentum=optax.tree.zeros_like(params) if use_momentum else None,
        )

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        nu = jax.tree.map(
            lambda g, v: decay * v + (1 - decay) * _numerics.abs_sq(g), updates, state.nu
        )
        if centered:
            grad_avg = jax.tree.map(
                lambda g, a: decay * a + (1 - decay) * g, updates, state.grad_avg
            )
            denom = jax.tree.map(lambda v, a: jnp.sqrt(v - _numerics.abs_sq(a)) + eps, nu, grad_avg)
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

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rmsprop(
    lr: optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    momentum: jax.typing.ArrayLike | None = None,
    *,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp: steps scaled by a moving root mean square of the gradients.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`v` the
    moving mean of :math:`g^2` (:math:`v_0 = 0`), :math:`\rho` its decay,
    :math:`\alpha` the learning rate, :math:`\varepsilon` a small constant; all
    operations are elementwise.

    .. math::

        v \leftarrow \rho v + (1 - \rho) |g|^2 \; ; \quad
        \theta \leftarrow \theta - \alpha \, g / (\sqrt{v} + \varepsilon)

    With ``centered=True`` the denominator is :math:`\sqrt{v - |\bar g|^2} + \varepsilon`,
    :math:`\bar g \leftarrow \rho \bar g + (1 - \rho) g`; with ``momentum`` :math:`\mu`
    the step goes through a buffer, :math:`b \leftarrow \mu b + g/(\cdot)`,
    :math:`\theta \leftarrow \theta - \alpha b` (see :func:`scale_by_rmsprop`).

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      decay: :math:`\rho` in [0, 1) (torch's ``alpha``).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      momentum: :math:`\mu` in [0, 1), or ``None`` (the default, torch's 0):
        no momentum buffer. A number, 0 included, keeps a buffer.
      centered: keyword-only; divide by the estimated standard deviation.

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_rmsprop(...), scale_by_learning_rate(lr))``.

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
      Complex parameters: :math:`v` averages :math:`|g|^2`, optax's convention,
      not ``torch.optim.RMSprop``'s (see :mod:`jft.optim`).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(
            scale_by_rmsprop(decay, eps, momentum, centered=centered),
            scale_by_learning_rate(lr),
        ),
        "rmsprop",
    )
