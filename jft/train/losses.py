"""Losses from optax, as ``loss_fn(logits, batch)`` for :func:`jft.train.make_train_step`.

Each loss is a :class:`Loss`: calling it gives the mean over the batch's rows
(over the rows whose ``batch["mask"]`` is true, when the batch has a mask, as
padded eval batches do); :meth:`Loss.per_example` gives one value per row, which
the eval step sums.

- ``softmax_xent``: ``optax.softmax_cross_entropy`` on integer labels
  ``(B,)`` or one-hot / soft labels ``(B, C)``, with label smoothing
  (``optax.smooth_labels``: ``(1 - α) y + α / C``).
- ``sigmoid_xent``: ``optax.sigmoid_binary_cross_entropy``, averaged over the
  outputs: binary (logits ``(B, 1)`` or ``(B,)``, labels ``(B,)`` of 0/1),
  one-vs-all on integer labels with ``C > 1`` outputs, or multi-label targets
  ``(B, C)``; label smoothing moves targets to ``(1 - α) y + α / 2``.
- ``mse``: ``optax.squared_error`` averaged over the outputs, the targets in
  ``batch["label"]`` (cast to float, shaped like the outputs).
- ``causal_lm_xent``: next-token cross-entropy of a decoder language model,
  a mean over the counted tokens (Hugging Face ``labels`` with ``-100``, or
  ``input_ids`` with ``attention_mask`` and a completion-only ``loss_mask``).

Every loss reads its targets from ``batch["label"]``, or ``batch["labels"]`` as
Hugging Face names them (:func:`jft.train.inputs.labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft._registry import Registry
from jft.train.inputs import labels as batch_labels

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "Loss",
    "TokenLoss",
    "causal_lm_xent",
    "get",
    "mse",
    "names",
    "sigmoid_xent",
    "softmax_xent",
]

Batch = Mapping[str, Any]


class Loss:
    """A loss over a batch: ``loss(logits, batch)`` is the (masked) mean of ``per_example``.

    Attributes:
      name: the registry name.
      per_example: ``(logits, batch) -> (B,)`` float32 losses, one per row.
    """

    def __init__(self, name: str, per_example: Callable[[jax.Array, Batch], jax.Array]):
        self.name = name
        self.per_example = per_example

    def __call__(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """The mean loss over the rows, or over those with ``batch["mask"]`` true."""
        losses = self.per_example(logits, batch)
        if "mask" not in batch:
            return jnp.mean(losses)
        mask = jnp.asarray(batch["mask"], losses.dtype)
        return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"


def _float_logits(logits: jax.Array) -> jax.Array:
    return jnp.asarray(logits, jnp.float32)


def softmax_xent(*, label_smoothing: float = 0.0) -> Loss:
    """Softmax cross-entropy on integer labels ``(B,)`` or one-hot / soft labels ``(B, C)``.

    Args:
      label_smoothing: ``α``; the targets become ``(1 - α) y + α / C``.
    """

    def per_example(logits, batch):
        logits = _float_logits(logits)
        labels = batch_labels(batch)
        if labels.ndim == logits.ndim - 1 and jnp.issubdtype(labels.dtype, jnp.integer):
            if not label_smoothing:
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            labels = jax.nn.one_hot(labels, logits.shape[-1])
        labels = jnp.asarray(labels, jnp.float32)
        if label_smoothing:
            labels = optax.smooth_labels(labels, label_smoothing)
        return optax.softmax_cross_entropy(logits, labels)

    return Loss("softmax_xent", per_example)


def sigmoid_xent(*, label_smoothing: float = 0.0) -> Loss:
    """Sigmoid binary cross-entropy, averaged over the outputs of each row.

    Args:
      label_smoothing: ``α``; the 0/1 targets become ``(1 - α) y + α / 2``.
    """

    def per_example(logits, batch):
        logits = _float_logits(logits)
        labels = batch_labels(batch)
        if logits.ndim == 1:
            logits = logits[:, None]
        if labels.ndim == 1:
            if logits.shape[-1] == 1:
                labels = labels[:, None]
            else:  # integer classes, one-vs-all
                labels = jax.nn.one_hot(labels, logits.shape[-1])
        labels = jnp.asarray(labels, jnp.float32)
        if label_smoothing:
            labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
        losses = optax.sigmoid_binary_cross_entropy(logits, labels)
        return jnp.mean(losses.reshape(losses.shape[0], -1), axis=-1)

    return Loss("sigmoid_xent", per_example)


def mse() -> Loss:
    """Mean squared error between the outputs and ``batch["label"]`` (as float)."""

    def per_example(outputs, batch):
        outputs = _float_logits(outputs)
        targets = jnp.asarray(batch_labels(batch), jnp.float32).reshape(outputs.shape)
        losses = optax.squared_error(outputs, targets)
        return jnp.mean(losses.reshape(losses.shape[0], -1), axis=-1)

    return Loss("mse", per_example)


IGNORE_INDEX = -100
"""A ``labels`` value whose token is not predicted (Hugging Face's ``ignore_index``)."""


class TokenLoss(Loss):
    """A loss over tokens: ``loss(logits, batch)`` is the mean over every counted token.

    ``per_token(logits, batch) -> (losses (B, T'), weights (B, T'))``; the batch's
    loss is ``sum(losses * weights) / sum(weights)`` (as Hugging Face's causal-LM
    loss, so long and short rows weigh by their token counts), with rows whose
    ``batch["mask"]`` is false left out. ``per_example`` is each row's mean.
    """

    def __init__(self, name: str, per_token: Callable[[jax.Array, Batch], tuple[Any, Any]]):
        def per_example(logits: jax.Array, batch: Batch) -> jax.Array:
            losses, weights = per_token(logits, batch)
            return jnp.sum(losses * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)

        super().__init__(name, per_example)
        self.per_token = per_token

    def __call__(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """The mean loss over the counted tokens of the rows with ``batch["mask"]`` true."""
        losses, weights = self.per_token(logits, batch)
        if "mask" in batch:
            weights = weights * jnp.asarray(batch["mask"], weights.dtype)[:, None]
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def causal_lm_xent() -> TokenLoss:
    """Next-token cross-entropy of a causal language model, over the tokens that count.

    The logits ``(B, T, V)`` at position ``t`` predict token ``t + 1``. The targets
    are ``batch["labels"]`` ``(B, T)`` where given, a token ``-100``
    (:data:`IGNORE_INDEX`) not counted, exactly as Hugging Face's ``*ForCausalLM``
    loss; otherwise ``batch["input_ids"]``, counted where ``attention_mask`` (padding)
    and ``loss_mask`` (0 on a prompt, 1 on its completion, for completion-only
    fine-tuning) are 1. The mean is over all counted tokens of the batch.
    """

    def per_token(logits, batch):
        logits = _float_logits(logits)[:, :-1]
        if "labels" in batch or "label" in batch:
            targets = jnp.asarray(batch_labels(batch))[:, 1:]
            weights = (targets != IGNORE_INDEX).astype(jnp.float32)
        else:
            targets = jnp.asarray(batch["input_ids"])[:, 1:]
            weights = jnp.ones(targets.shape, jnp.float32)
            for key in ("attention_mask", "loss_mask"):
                if key in batch:  # packed rows' attention_mask holds segment ids 1, 2, ...
                    weights = weights * (jnp.asarray(batch[key])[:, 1:] != 0)
        targets = jnp.where(weights > 0, targets, 0)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets), weights

    return TokenLoss("causal_lm_xent", per_token)


LOSSES: Registry[Callable[..., Loss]] = Registry(
    "loss",
    {
        "softmax_xent": softmax_xent,
        "sigmoid_xent": sigmoid_xent,
        "mse": mse,
        "causal_lm_xent": causal_lm_xent,
    },
)


def names() -> list[str]:
    """The names :func:`get` knows."""
    return LOSSES.names()


def get(name: str, **kwargs: Any) -> Loss:
    """The loss called ``name`` (``config.loss.name``), built with ``kwargs``.

    ``mse`` and ``causal_lm_xent`` take no arguments; a ``label_smoothing`` of 0
    is accepted (and ignored) for them, so one config schema fits every loss.

    Raises:
      UnknownNameError: an unknown name (the message lists the known ones).
      ValueError: an argument the loss does not take.
    """
    factory = LOSSES.get(name)
    if name in ("mse", "causal_lm_xent") and not kwargs.get("label_smoothing", 0.0):
        kwargs.pop("label_smoothing", None)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"loss {name!r}: {e}") from None
