"""How a batch becomes a model's arguments, for the train and eval steps and the loop.

A step's ``inputs`` is the batch key of a model's single input (``"image"``), or
a function of the batch returning a value, a tuple of positional arguments, or a
dict of keyword arguments (a text model's ``input_ids``, ``attention_mask``,
``token_type_ids``). :func:`inputs_for` picks it from what :func:`jft.data.info`
says a data set yields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LABEL_KEYS", "TEXT_KEYS", "Inputs", "inputs_for", "labels", "model_args"]

Batch = Mapping[str, Any]
Inputs = str | Callable[[Batch], Any] | None

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""The keys of a tokenized batch that text models (``jft.models.Bert``) take."""

LABEL_KEYS = ("label", "labels")
"""Where a batch holds its targets: jft's data sets say ``label``, Hugging Face ``labels``."""


def labels(batch: Batch) -> Any:
    """The targets of ``batch``: ``batch["label"]``, else ``batch["labels"]`` (Hugging Face).

    Raises:
      KeyError: neither key is there; the message lists the batch's keys.

    >>> labels({"image": 0, "labels": 3})
    3
    """
    for key in LABEL_KEYS:
        if key in batch:
            return batch[key]
    raise KeyError(
        f"the batch has no labels: expected a key {' or '.join(map(repr, LABEL_KEYS))}, "
        f"got {sorted(batch)}"
    )


def model_args(inputs: Inputs, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model.apply(variables, *args, **kwargs)`` from ``batch``.

    ``inputs=None`` reads them off the batch's keys (:func:`inputs_for`): the
    text keys as keyword arguments when there is an ``input_ids``, else
    ``batch["image"]``, else the batch's one key that is not a label or mask.

    >>> model_args(None, {"input_ids": 1, "attention_mask": 2, "labels": 0})
    ((), {'input_ids': 1, 'attention_mask': 2})
    >>> model_args(None, {"x": 5, "label": 0, "mask": 1})
    ((5,), {})
    """
    if inputs is None:
        inputs = inputs_for(batch)
    if isinstance(inputs, str):
        return (batch[inputs],), {}
    args = inputs(batch)
    if isinstance(args, Mapping):
        return (), dict(args)
    if isinstance(args, tuple):
        return args, {}
    return (args,), {}


def inputs_for(features: Mapping[str, Any]) -> Inputs:
    """The ``inputs`` of a step for a data set with these ``jft.data.info(...).features``.

    Tokenized text gives a function returning the text keys as keyword arguments;
    anything else is an image model's ``"image"``.

    >>> inputs_for({"image": ((8, 8, 1), "float32"), "label": ((), "int32")})
    'image'
    >>> sorted(inputs_for({"input_ids": None, "attention_mask": None})({
    ...     "input_ids": 1, "attention_mask": 2, "label": 3}))
    ['attention_mask', 'input_ids']
    """
    if "input_ids" in features:
        keys = [k for k in TEXT_KEYS if k in features]
        return lambda batch: {k: batch[k] for k in keys}
    if "image" in features:
        return "image"
    others = [k for k in features if k not in (*LABEL_KEYS, "mask")]
    if len(others) == 1:
        return others[0]
    raise KeyError(
        f"cannot tell the model's input among the batch keys {sorted(features)}: "
        "name it with inputs='KEY' (or a function of the batch)"
    )
