"""The train state: every array a train step reads and writes, as one orbax-serializable pytree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jft import partition

__all__ = ["TrainState", "create_train_state"]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree of arrays, orbax-serializable.

    Attributes:
      step: the number of steps taken, an int32 scalar.
      trainable: the trainable half of :func:`jft.partition.split`.
      frozen: the frozen half, passed through unchanged.
      batch_stats: the BatchNorm running statistics (``{}`` without BatchNorm).
      opt_state: the :func:`jft.partition.optimizer` state of ``trainable``.
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses ``fold_in(rng, t)``.
      nonfinite: how many steps in a row, up to this one, had a non-finite loss,
        gradient, update or new parameter (and so were skipped); an int32
        scalar, 0 after a good step.
    """

    step: jax.Array
    trainable: dict[str, Any]
    frozen: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array

    @property
    def params(self) -> dict[str, Any]:
        """All parameters, trainable and frozen merged."""
        return partition.merge(self.trainable, self.frozen)

    @property
    def variables(self) -> dict[str, Any]:
        """The flax variables (``params`` and ``batch_stats``), for ``model.apply``."""
        variables = {"params": self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


def create_train_state(
    variables: Mapping[str, Any], rules: partition.Rules, *, rng: int | jax.Array = 0
) -> TrainState:
    """The initial :class:`TrainState` of a model's ``variables`` under ``rules``.

    The state holds the very arrays of ``variables``; the train step donates
    them, so do not use ``variables`` after the first step (copy them first if
    you need them).

    Args:
      variables: flax variables, ``{"params": ..., "batch_stats": ...}``.
      rules: ``(regex, optimizer_or_None)`` pairs (:mod:`jft.partition`).
      rng: a seed or a raw PRNG key, for dropout.

    Raises:
      jft.partition.PartitionError: the rules do not fit the parameters.
    """
    trainable, frozen = partition.split(variables["params"], rules)
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        batch_stats=dict(variables.get("batch_stats", {})),
        opt_state=partition.optimizer(rules).init(trainable),
        rng=rng,
        nonfinite=jnp.zeros((), jnp.int32),
    )
