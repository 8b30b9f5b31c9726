"""Layer-wise learning-rate decay: partition rules whose rate falls by a factor per block.

The rules it returns are ordinary :mod:`jft.partition` rules, so they compose
with frozen rules and any optimizer, and a config builds them from
``config.layerwise_lr`` (:mod:`jft.train.build`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import optax

from jft import optim, partition
from jft.partition import PartitionError

__all__ = ["layerwise_lr_rules"]


def _default_optimizer(lr: float) -> optax.GradientTransformation:
    return optim.adamw(lr)


def _pattern(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except (re.error, TypeError) as e:
        raise PartitionError(f"frozen has an invalid regex {regex!r}: {e}") from None


def layerwise_lr_rules(
    num_layers: int,
    base_lr: float,
    decay: float,
    make_optimizer: Callable[[float], optax.GradientTransformation] | None = None,
    *,
    frozen: Sequence[str] = (),
    layer_prefix: str = "backbone/encoder/layer_",
    embeddings: str | None = "backbone/embeddings/.*",
    rest: str = ".*",
) -> list[partition.Rule]:
    r"""Rules for layer-wise learning-rate decay over transformer blocks.

    Layer :math:`i` of :math:`L` (``backbone/encoder/layer_{i}``) trains with
    :math:`\alpha \delta^{L - i}`, the embeddings with :math:`\alpha
    \delta^{L + 1}` (the deepest decay), and everything else (the head, a final
    norm, a pooler) with the base rate :math:`\alpha`, as in BEiT and ELECTRA.

    Args:
      num_layers: the number of transformer blocks :math:`L`.
      base_lr: :math:`\alpha`, the head's learning rate.
      decay: :math:`\delta`, the factor per block going down.
      make_optimizer: builds one group's optimizer from its learning rate;
        ``jft.optim.adamw`` by default.
      frozen: regexes frozen before all other rules (``(regex, None)`` first); a
        block or the embeddings that they freeze get no rule of their own.
      layer_prefix: the blocks' path up to the block number.
      embeddings: regex of the embedding parameters, or ``None`` if there are none.
      rest: regex of the parameters trained at the base rate; matched last.

    Returns:
      A rules list: the frozen rules, the blocks from the top down, the
      embeddings, then ``rest``.

    >>> import optax
    >>> lrs = []
    >>> rules = layerwise_lr_rules(2, 1.0, 0.5, lambda lr: lrs.append(lr) or optax.sgd(lr))
    >>> [regex for regex, _ in rules]
    ['backbone/encoder/layer_1/.*', 'backbone/encoder/layer_0/.*', 'backbone/embeddings/.*', '.*']
    >>> lrs
    [0.5, 0.25, 0.125, 1.0]
    """
    make_optimizer = make_optimizer or _default_optimizer
    frozen_patterns = [_pattern(regex) for regex in frozen]

    def is_frozen(group: str) -> bool:
        # A group whose paths a frozen rule claims gets no rule: it would be dead.
        probe = group[:-2] + "_" if group.endswith("/.*") else group
        return group in frozen or any(p.fullmatch(probe) for p in frozen_patterns)

    rules: list[partition.Rule] = [(regex, None) for regex in frozen]
    for i in reversed(range(num_layers)):
        lr = base_lr * decay ** (num_layers - i)
        group = f"{re.escape(layer_prefix)}{i}/.*"
        if not is_frozen(group):
            rules.append((group, make_optimizer(lr)))
    if embeddings is not None and not is_frozen(embeddings):
        rules.append((embeddings, make_optimizer(base_lr * decay ** (num_layers + 1))))
    rules.append((rest, make_optimizer(base_lr)))
    return rules
