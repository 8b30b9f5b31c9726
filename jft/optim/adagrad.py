"""AdaGrad: G ← G + g² ; θ ← θ − α g/(√G + ε), as torch.optim.Adagrad."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _numerics, _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["AdagradState", "adagrad", "scale_by_adagrad"]


class AdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`: the sum of squared gradients ``G``."""

    sum_of_squares: optax.Updates


def scale_by_adagrad(
    eps: jax.typing.ArrayLike = 1e-10, initial_accumulator_value: jax.typing.ArrayLike = 0.0
) -> optax.GradientTransformationExtraArgs:
    r"""Divides the gradient by the root of the running sum of its squares, plus ``eps``.

    .. math::

        G \leftarrow G + |g|^2, \quad G_0 = G_{\text{init}}; \qquad
        u = g / (\sqrt{G} + \varepsilon)

    Args:
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      initial_accumulator_value: :math:`G_{\text{init}} \ge 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AdagradState`.
    """
    _validate.nonnegative(eps, "eps")
    _validate.nonnegative(initial_accumulator_value, "initial_accumulator_value")

    def init_fn(params):
        _validate.parameters(params, "scale_by_adagrad")
        return AdagradState(sum_of_squares=optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        sum_of_squares = jax.tree.map(
            lambda g, s: s + _numerics.abs_sq(g), updates, state.sum_of_squares
        )
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sum_of_squares)
        return updates, AdagradState(sum_of_squares=sum_of_squares)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adagrad(
    lr: optax.ScalarOrSchedule,
    eps: jax.typing.ArrayLike = 1e-10,
    initial_accumulator_value: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGrad: per-coordinate steps scaled by the history of squared gradients.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`G` the
    running sum of squared gradients (starting at ``initial_accumulator_value``),
    :math:`\alpha` the learning rate, :math:`\varepsilon` a small constant; all
    operations are elementwise.

    .. math::

        G \leftarrow G + |g|^2 \; ; \quad
        \theta \leftarrow \theta - \alpha \, g / (\sqrt{G} + \varepsilon)

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      initial_accumulator_value: initial :math:`G` (``>= 0``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_adagrad(eps, initial_accumulator_value),
      scale_by_learning_rate(lr))``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.adagrad(0.1)
      >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> updates  # the first step is -lr * sign(g)
      Array([-0.1,  0.1], dtype=float32)

    References:
      Duchi, Hazan and Singer, *Adaptive subgradient methods for online learning
      and stochastic optimization*, JMLR 2011.

    Note:
      Equals ``torch.optim.Adagrad(lr=lr, eps=eps,
      initial_accumulator_value=...)`` (with its ``lr_decay=0``,
      ``weight_decay=0``). ``optax.adagrad`` differs: it starts :math:`G` at 0.1,
      puts :math:`\varepsilon` (default 1e-7) inside the square root, and returns
      0 where :math:`G = 0`. For optax's behaviour use ``optax.adagrad(lr)``; the
      two agree when both start :math:`G` at the same value and ``eps=0`` (and no
      :math:`G` is 0).
      Complex parameters: :math:`G` sums :math:`|g|^2`, optax's convention, not
      ``torch.optim.Adagrad``'s (see :mod:`jft.optim`).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_adagrad(eps, initial_accumulator_value), scale_by_learning_rate(lr)),
        "adagrad",
    )
