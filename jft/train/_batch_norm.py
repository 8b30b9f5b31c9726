"""BatchNorm in the train step: the model is cloned with its BatchNorm attributes set.

Two settings, one mechanism: the step clones the model with the attributes its
BatchNorm layers read.

- ``frozen_bn``: the paths of BatchNorm layers whose scale and bias are frozen,
  which then use and keep their running statistics (Keras's convention).
- ``bn_axis_name``: under ``pmap`` each device sees its shard of the batch; with
  the ``"data"`` axis here BatchNorm reduces its statistics over the devices
  (``nn.BatchNorm``'s ``axis_name``), so it normalizes with the statistics of
  the global batch, as one device and the mesh path do.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jft import partition
from jft.models.frozen_bn import frozen_bn_patterns


def _needs(model: nn.Module, attribute: str, why: str) -> None:
    if not hasattr(model, attribute):
        raise ValueError(f"{type(model).__name__} has no {attribute} attribute, so {why}")


def for_step(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    rules: partition.Rules,
    *,
    freeze_bn: bool,
    axis_name: str | None,
) -> nn.Module:
    """``model`` as the train step runs it, cloned with its BatchNorm attributes set.

    Only the parameter paths are read, so under ``jax.jit`` this runs once, at
    trace time. A model without BatchNorm (no ``batch_stats``) comes back as it is.

    Args:
      model: the flax module.
      params: its parameters (arrays or tracers).
      batch_stats: its BatchNorm statistics (``{}`` without BatchNorm).
      rules: the partition rules; a BatchNorm layer with frozen scale and bias
        is frozen with ``freeze_bn``.
      freeze_bn: add the frozen layers' paths to ``model.frozen_bn``.
      axis_name: set ``model.bn_axis_name`` to it (the ``pmap`` axis), unless the
        model already reduces over an axis of its own.

    Raises:
      ValueError: the model needs ``frozen_bn`` or ``bn_axis_name`` and has no such
        attribute.
    """
    if not batch_stats:
        return model
    changes: dict[str, Any] = {}
    frozen = partition.is_frozen(rules)
    patterns = frozen_bn_patterns(params, batch_stats, frozen) if freeze_bn else ()
    if patterns:
        _needs(
            model,
            "frozen_bn",
            "its frozen BatchNorm layers cannot keep their statistics; pass freeze_bn=False",
        )
        changes["frozen_bn"] = tuple(model.frozen_bn) + patterns
    if axis_name is not None and getattr(model, "bn_axis_name", None) is None:
        _needs(
            model,
            "bn_axis_name",
            "its BatchNorm layers cannot average their statistics over the devices under "
            "parallel='pmap'; give it one (passed to nn.BatchNorm's axis_name) or use "
            "parallel='jit'",
        )
        changes["bn_axis_name"] = axis_name
    return model.clone(**changes) if changes else model
