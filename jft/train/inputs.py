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

__all__ = ["TEXT_KEYS", "Inputs", "inputs_for", "model_args"]

Batch = Mapping[str, Any]
Inputs = str | Callable[[Batch], Any]

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""The keys of a tokenized batch that text models (``jft.models.Bert``) take."""


def model_args(inputs: Inputs, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model.apply(variables, *args, **kwargs)`` from ``batch``."""
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
    return "image"
