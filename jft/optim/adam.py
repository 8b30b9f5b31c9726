"""Adam and AdamW: bias-corrected moments m̂, v̂ ; θ ← θ − α m̂/(√v̂ + ε), as torch.optim."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft.optim import _numerics, _validate
from jft.optim.learning_rate import scale_by_learning_rate

__all__ = ["AdamState", "adam", "adamw", "scale_by_adam"]


class AdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step count ``t`` (int32), moments ``m`` and ``v``."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales the gradient by Adam's bias-corrected moment estimates.

    .. math::

        t \leftarrow t + 1, \quad
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) |g|^2

        \hat m = m / (1 - \beta_1^t), \quad \hat v = v / (1 - \beta_2^t), \quad
        u = \hat m / (\sqrt{\hat v} + \varepsilon)

    Args:
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AdamState`.
    """
    _validate.unit_interval(b1, "b1")
    _validate.unit_interval(b2, "b2")
    _validate.nonnegative(eps, "eps")

    def init_fn(params):
        _validate.parameters(params, "scale_by_adam")
        return AdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params, extra_args
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * _numerics.abs_sq(g), updates, state.nu)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, AdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam(
    lr: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam: steps from bias-corrected moving moments of the gradient.

    Symbols: :math:`\theta` the parameters, :math:`g` the gradient, :math:`t` the
    step (1 at the first update), :math:`m, v` moving means of :math:`g` and
    :math:`|g|^2` (both 0 at start) with decays :math:`\beta_1, \beta_2`,
    :math:`\hat m, \hat v` their bias-corrected values, :math:`\alpha` the
    learning rate, :math:`\varepsilon` a small constant; elementwise.

    .. math::

        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) |g|^2, \quad
        \hat m = \frac{m}{1 - \beta_1^t}, \quad \hat v = \frac{v}{1 - \beta_2^t} \; ; \quad
        \theta \leftarrow \theta - \alpha \, \hat m / (\sqrt{\hat v} + \varepsilon)

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.

    Returns:
      An ``optax.GradientTransformationExtraArgs``:
      ``optax.chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.adam(0.1, b1=0.5, b2=0.75, eps=0.0)
      >>> updates, _ = tx.update(jnp.array([4.0, -0.01]), tx.init(jnp.zeros(2)))
      >>> updates  # the first step is -lr * sign(g)
      Array([-0.1,  0.1], dtype=float32)

    References:
      Kingma and Ba, *Adam: a method for stochastic optimization*, ICLR 2015.

    Note:
      Equals ``torch.optim.Adam(lr=lr, betas=(b1, b2), eps=eps)`` and
      ``optax.adam(lr, b1, b2, eps)`` (whose default ``eps_root=0``); this
      version has no ``eps_root``, ``mu_dtype`` or ``nesterov``: use ``optax.adam``
      for those.

      Complex parameters: :math:`v` averages :math:`|g|^2`, optax's convention,
      not ``torch.optim.Adam``'s (see :mod:`jft.optim`).
    """
    _validate.learning_rate(lr)
    return _validate.checked(
        optax.chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr)), "adam"
    )


def adamw(
    lr: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    *,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW: Adam with weight decay decoupled from the gradient, as ``torch.optim.AdamW``.

    Symbols: as in :func:`adam`, and :math:`\lambda` the weight decay
    (``weight_decay``).

    .. math::

        \theta \leftarrow \theta (1 - \alpha \lambda) \; ; \quad
        \theta \leftarrow \theta - \alpha \, \hat m / (\sqrt{\hat v} + \varepsilon)

    i.e. the update is :math:`-\alpha (\hat m / (\sqrt{\hat v} + \varepsilon) + \lambda
    \theta)`, with :math:`m, v, \hat m, \hat v` as in :func:`adam`. With a schedule
    the decay uses the same scheduled :math:`\alpha_t`, as torch's does.

    Args:
      lr: learning rate :math:`\alpha` (``>= 0``), or an optax schedule.
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\varepsilon \ge 0`, added outside the square root.
      weight_decay: :math:`\lambda \ge 0`.
      mask: keyword-only; as ``optax.add_decayed_weights``' mask: a pytree of
        bools (or a function of params giving one) saying which leaves decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``optax.chain(scale_by_adam(b1,
      b2, eps), optax.add_decayed_weights(weight_decay, mask),
      scale_by_learning_rate(lr))``. Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, jft
      >>> tx = jft.optim.adamw(0.1, 0.5, 0.75, eps=0.0, weight_decay=0.5)
      >>> params = jnp.array([2.0])
      >>> updates, _ = tx.update(jnp.array([1.0]), tx.init(params), params)
      >>> updates  # -0.1 * (1 + 0.5 * 2)
      Array([-0.2], dtype=float32)

    References:
      Loshchilov and Hutter, *Decoupled weight decay regularization*, ICLR 2019.

    Note:
      Equals ``torch.optim.AdamW(lr=lr, betas=(b1, b2), eps=eps,
      weight_decay=weight_decay)``, whose default ``weight_decay`` is 0.01, as here.
      ``optax.adamw`` defaults to ``weight_decay=1e-4``; for optax's behaviour pass
      ``weight_decay=1e-4`` (then the two are equal). Complex parameters: as
      :func:`adam`.
    """
    _validate.learning_rate(lr)
    _validate.nonnegative(weight_decay, "weight_decay")
    return _validate.checked(
        optax.chain(
            scale_by_adam(b1, b2, eps),
            optax.add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(lr),
        ),
        "adamw",
    )
