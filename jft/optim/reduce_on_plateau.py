"""Scale the updates down when a monitored metric stops improving, as torch's ReduceLROnPlateau."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jft.optim import _validate

__all__ = ["ReduceOnPlateauState", "reduce_on_plateau"]


class ReduceOnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`.

    ``scale`` (float32) multiplies the updates; ``best`` (float32) is the best
    metric so far; ``num_bad_steps`` and ``cooldown_count`` (int32) are torch's
    ``num_bad_epochs`` and ``cooldown_counter``.
    """

    scale: jax.Array
    best: jax.Array
    num_bad_steps: jax.Array
    cooldown_count: jax.Array


def reduce_on_plateau(
    factor: ArrayLike = 0.1,
    patience: ArrayLike = 10,
    *,
    mode: str = "min",
    threshold: ArrayLike = 1e-4,
    threshold_mode: str = "rel",
    cooldown: ArrayLike = 0,
    min_scale: ArrayLike = 0.0,
    eps: ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies the updates by a scale that drops by ``factor`` on a plateau of a metric.

    Symbols: :math:`a` the metric passed as ``update(..., value=a)``, :math:`b` the
    best metric so far (:math:`+\infty` for ``"min"``, :math:`-\infty` for
    ``"max"`` at start), :math:`\tau` the threshold, :math:`n` the number of bad
    steps, :math:`c` the cooldown counter, :math:`s` the scale (1 at start),
    :math:`f` the factor, :math:`P` the patience, :math:`C` the cooldown.

    .. math::

        \text{better} = \begin{cases}
          a < b (1 - \tau) & \text{min, rel} \qquad a < b - \tau \quad \text{min, abs} \\
          a > b (1 + \tau) & \text{max, rel} \qquad a > b + \tau \quad \text{max, abs}
        \end{cases}

        \text{if better: } b \leftarrow a,\ n \leftarrow 0 \text{ else } n \leftarrow n + 1;
        \quad \text{if } c > 0\text{: } c \leftarrow c - 1,\ n \leftarrow 0

        \text{if } n > P\text{: } s \leftarrow \max(f s, s_{\min})
        \text{ (only if that lowers } s \text{ by more than } \epsilon),\
        c \leftarrow C,\ n \leftarrow 0; \qquad u = s \, g

    This is ``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` line by line (its
    ``_is_better`` included, so a negative metric with the relative threshold
    behaves as torch's does), with the learning rate replaced by the scale
    :math:`s = \text{lr} / \text{initial lr}`. Call ``update`` once per metric
    (e.g. once per epoch with the validation loss); every call is one torch
    ``step``. All branches are ``jnp.where``, so it jit-compiles.

    Args:
      factor: :math:`f` in [0, 1).
      patience: :math:`P \ge 0`, bad steps tolerated before reducing.
      mode: keyword-only; ``"min"`` (lower is better) or ``"max"``.
      threshold: keyword-only; :math:`\tau \ge 0`.
      threshold_mode: keyword-only; ``"rel"`` or ``"abs"``.
      cooldown: keyword-only; :math:`C \ge 0`, steps after a reduction during
        which bad steps are not counted.
      min_scale: keyword-only; :math:`s_{\min} \ge 0`, torch's ``min_lr / lr``.
      eps: keyword-only; :math:`\epsilon`, smallest change of scale applied
        (torch's ``eps``, which torch compares with the learning rate: the two
        agree when the initial learning rate is 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`ReduceOnPlateauState`; its ``update`` needs ``value=``.

    Example:
      >>> import jax.numpy as jnp, optax, jft
      >>> tx = optax.chain(jft.optim.adam(1e-3), jft.optim.reduce_on_plateau(0.5, patience=1))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for loss in [3.0, 2.0, 2.0, 2.0]:
      ...     updates, state = tx.update(jnp.ones(2), state, params, value=loss)
      >>> state[1].scale
      Array(0.5, dtype=float32)

    References:
      PyTorch, ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Note:
      ``optax.contrib.reduce_on_plateau`` differs: it has no ``mode="max"``, uses
      ``a < (1 - rtol) b - atol``, which is not torch's rule for negative metrics,
      reduces after ``patience`` bad steps rather than ``patience + 1``, and can
      average ``accumulation_size`` values per step (average them yourself here).
    """
    if mode not in ("min", "max"):
        raise _validate.HyperparameterError(
            f'jft.optim.reduce_on_plateau: mode must be "min" or "max", got mode={mode!r}'
        )
    if threshold_mode not in ("rel", "abs"):
        raise _validate.HyperparameterError(
            f'jft.optim.reduce_on_plateau: threshold_mode must be "rel" or "abs", '
            f"got {threshold_mode=}"
        )
    _validate.unit_interval(factor, "factor")
    _validate.nonnegative(patience, "patience")
    _validate.nonnegative(threshold, "threshold")
    _validate.nonnegative(cooldown, "cooldown")
    _validate.nonnegative(min_scale, "min_scale")
    _validate.nonnegative(eps, "eps")

    def is_better(a, best):
        if mode == "min" and threshold_mode == "rel":
            return a < best * (1.0 - threshold)
        if mode == "min":
            return a < best - threshold
        if threshold_mode == "rel":
            return a > best * (threshold + 1.0)
        return a > best + threshold

    def init_fn(params):
        _validate.parameters(params, "reduce_on_plateau")
        return ReduceOnPlateauState(
            scale=jnp.ones([], jnp.float32),
            best=jnp.asarray(jnp.inf if mode == "min" else -jnp.inf, jnp.float32),
            num_bad_steps=jnp.zeros([], jnp.int32),
            cooldown_count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value: ArrayLike, **extra_args: Any):
        del params, extra_args
        a = jnp.asarray(value, jnp.float32)
        better = is_better(a, state.best)
        best = jnp.where(better, a, state.best)
        bad = jnp.where(better, 0, state.num_bad_steps + 1)
        in_cooldown = state.cooldown_count > 0
        cooldown_count = jnp.where(in_cooldown, state.cooldown_count - 1, state.cooldown_count)
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        new_scale = jnp.maximum(state.scale * factor, min_scale).astype(jnp.float32)
        scale = jnp.where(reduce & (state.scale - new_scale > eps), new_scale, state.scale)
        cooldown_count = jnp.where(reduce, cooldown, cooldown_count).astype(jnp.int32)
        bad = jnp.where(reduce, 0, bad).astype(jnp.int32)
        updates = jax.tree.map(lambda g: (scale * g).astype(g.dtype), updates)
        return updates, ReduceOnPlateauState(scale, best, bad, cooldown_count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
