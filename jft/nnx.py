"""jft models, partition rules and update rules from a Flax NNX training loop.

jft's models are Flax linen modules; ``flax.nnx.bridge.ToNNX`` turns one into an
NNX module whose parameter paths are jft's (``backbone/conv1/kernel``), so the
same partition rules apply. :func:`optimizer` is ``nnx.Optimizer`` over the
parameters the rules train, each with its rule's update rule; frozen
parameters hold no optimizer state and, since ``nnx.grad`` differentiates only
the ``wrt`` filter given, cost no weight gradient. The README's "Flax NNX"
section has a whole loop (executed by tests/test_nnx.py).

For whole runs, :func:`jft.train.train_and_evaluate` stays
the tested path (checkpoints, resume, multi-device); use this module when your
own code is NNX.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import nnx

from jft import partition

__all__ = ["optimizer", "trainable", "transform"]


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def trainable(rules: partition.Rules) -> nnx.filterlib.Filter:
    """The NNX filter of the parameters ``rules`` train (not frozen, first match wins).

    A parameter that matches no rule is not selected here; :func:`optimizer`
    reports it, as :func:`jft.partition.labels` does.
    """
    compiled = [(re.compile(r), tx) for r, tx in rules]

    def train(path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = _path(path)
        for pattern, tx in compiled:
            if pattern.fullmatch(name):
                return tx is not None
        return False

    return train


def transform(rules: partition.Rules) -> optax.GradientTransformation:
    """:func:`jft.partition.optimizer` for the NNX state trees ``nnx.Optimizer`` passes.

    ``nnx.Optimizer`` hands its transformation ``nnx.State`` trees; jft's
    partitioned optimizer reads nested dicts. This converts on the way in and
    back to the updates' own structure on the way out; the state is jft's
    :class:`jft.partition.PartitionState` (one inner state per rule, none for
    frozen ones).
    """
    inner = partition.optimizer(rules)

    def pure(tree: Any) -> Any:
        return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree

    def init_fn(params: Any) -> Any:
        return inner.init(pure(params))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        del extra
        new, state = inner.update(pure(updates), state, pure(params))
        if isinstance(updates, nnx.State):
            out = jax.tree.map(lambda x: x, updates)  # a new State; updates stays as given
            nnx.replace_by_pure_dict(out, new)
            new = out
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optimizer(model: nnx.Module, rules: partition.Rules) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the parameters of ``model`` that ``rules`` train.

    Args:
      model: an NNX module, e.g. ``nnx.bridge.ToNNX(jft.models.get(...))`` after
        ``nnx.bridge.lazy_init``.
      rules: jft partition rules, ``(regex, optimizer_or_None)``; ``None`` freezes.

    Returns:
      The optimizer; its ``wrt`` is the filter of trainable parameters, to give
      ``nnx.grad``/``nnx.value_and_grad`` as ``argnums=nnx.DiffState(0, opt.wrt)``.

    Raises:
      PartitionError: a parameter matches no rule, or a rule matches none.
    """
    names = [_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    partition.labels(_nest({n: 0 for n in names}), rules)  # one-line errors, as jft.train
    return nnx.Optimizer(model, transform(rules), wrt=trainable(rules))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
