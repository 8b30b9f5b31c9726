"""Plain gradient descent: θ ← θ − α∇L(θ), on the full or on a minibatch gradient."""

import optax

from jft.optim import _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["gradient_descent", "sgd"]


def gradient_descent(lr: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""Gradient descent: a step of size ``lr`` against the gradient.

    Symbols: :math:`\theta` the parameters, :math:`\alpha` the learning rate
    (``lr``, a float or an optax schedule looked up at ``count`` = 0, 1, ...),
    :math:`\nabla L(\theta)` the gradient of the loss.

    .. math::

        \theta \leftarrow \theta - \alpha \nabla L(\theta)

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates are
      :math:`-\alpha \nabla L(\theta)`; add them with ``optax.apply_updates``.

    Example:
      >>> import jax.numpy as jnp, optax, jft
      >>> tx = jft.optim.gradient_descent(0.1)
      >>> params = jnp.array([1.0, 2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params))
      >>> optax.apply_updates(params, updates)
      Array([0.8, 1.6], dtype=float32)

    References:
      Cauchy, *Méthode générale pour la résolution des systèmes d'équations
      simultanées*, 1847.

    Note:
      The building block is the identity, so this is
      :func:`jft.optim.scale_by_learning_rate`; it equals ``optax.sgd(lr)`` and
      ``torch.optim.SGD(params, lr)``. :data:`jft.optim.sgd` is an alias of it (the
      same rule, fed a minibatch gradient).
      Complex parameters: the rule is linear in :math:`g`, so it applies as it
      stands, as in optax and ``torch.optim.SGD`` (pass the conjugate of
      ``jax.grad``'s gradient, as optax does).
    """
    _validate.learning_rate(lr)
    return _validate.checked(scale_by_learning_rate(lr), "gradient_descent")


sgd = gradient_descent
r"""Stochastic gradient descent: an alias of :func:`gradient_descent`.

The rule is the same, :math:`\theta \leftarrow \theta - \alpha \nabla L_B(\theta)`; only
the gradient fed to it differs (that of a minibatch :math:`B`). ``jft.optim.sgd is
jft.optim.gradient_descent``, and an error names ``gradient_descent``. Unlike
``optax.sgd`` and ``torch.optim.SGD`` it takes no ``momentum``: that is
:func:`jft.optim.heavy_ball`. Robbins and Monro, *A stochastic approximation method*, 1951.
"""
