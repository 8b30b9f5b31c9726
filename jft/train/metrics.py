"""Evaluation: sums of per-example statistics over (masked) batches, and the metrics from them.

:func:`make_eval_step` builds ``eval_step(state, batch) -> sums``: the loss
summed over the batch's valid rows, their count, the top-k hits and the
confusion matrix, all as sums, so that batches add up (:func:`accumulate`) and
:func:`finalize` turns the total into means. Rows whose ``batch["mask"]`` is
false (the padding of the last eval batch) count for nothing, so an eval over a
padded data set is exact.

>>> total = None
>>> for batch in eval_batches:                                # doctest: +SKIP
...     total = accumulate(total, eval_step(state, parallel.shard_batch(batch)))
>>> finalize(total)["accuracy"]                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.train import losses as losses_lib
from jft.train.inputs import labels as batch_labels
from jft.train.inputs import model_args
from jft.train.parallel import Parallel

__all__ = ["accumulate", "finalize", "make_eval_step"]

Batch = Mapping[str, Any]
Sums = dict[str, jax.Array]


def _classes(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Predicted and true class per row: argmax, or ``logit > 0`` for one output."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        pred = (logits.reshape(logits.shape[0]) > 0).astype(jnp.int32)
        true = (jnp.asarray(labels).reshape(labels.shape[0]) > 0.5).astype(jnp.int32)
        return pred, true
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if labels.ndim == logits.ndim:  # one-hot or soft labels
        labels = jnp.argmax(labels, axis=-1)
    return pred, labels.astype(jnp.int32)


def make_eval_step(
    model: nn.Module,
    *,
    num_classes: int,
    inputs: str | Callable[[Batch], Any] | None = None,
    loss_fn: losses_lib.Loss | Callable[[Any, Batch], jax.Array] | None = None,
    parallel: Parallel | str = "none",
    top_k: Sequence[int] = (1, 5),
    compute_dtype: Any = None,
) -> Callable[[Any, Batch], Sums]:
    """Builds ``eval_step(state, batch) -> sums`` for a classifier (or any model, with a loss).

    The model runs in eval mode (``train=False``: running BatchNorm statistics,
    no dropout) on the variables of ``state`` (a :class:`jft.train.TrainState`
    placed by ``parallel``, as the train step takes it); ``batch`` is placed
    with ``parallel.shard_batch`` and carries a bool ``"mask"``
    (all rows count without one).

    Args:
      model: the flax module, called as ``model.apply(variables, *args, train=False)``.
      num_classes: the classes of the confusion matrix (2 for a model with one
        logit, whose class is ``logit > 0``); 0 for no classification statistics
        (e.g. a regression with ``mse``).
      inputs: as for :func:`jft.train.make_train_step`.
      loss_fn: a :class:`jft.train.losses.Loss` (its per-example losses are
        summed over the valid rows), or any ``loss_fn(logits, batch)`` returning
        the mean over the valid rows; default ``softmax_xent``.
      parallel: a :class:`jft.train.parallel.Parallel`, or a mode name
        (``"none"``, ``"jit"`` or ``"pmap"``), as the state was placed.
      top_k: the ``k`` of the top-k accuracies (``k = 1`` is ``accuracy``);
        those above ``num_classes`` are left out.
      compute_dtype: as for :func:`jft.train.make_train_step`.

    Returns:
      The step. Its sums: ``count`` (valid rows), ``loss``, ``top_{k}`` (hits),
      and ``confusion`` (``[true, predicted]`` counts, int32).
    """
    par = Parallel.of(parallel)
    loss_fn = losses_lib.softmax_xent() if loss_fn is None else loss_fn
    if compute_dtype is not None and hasattr(model, "dtype"):
        model = model.clone(dtype=jnp.dtype(compute_dtype))
    ks = sorted({int(k) for k in top_k if 1 <= int(k) <= max(num_classes, 1)} | {1})

    def step(state: Any, batch: Batch) -> Sums:
        batch = par.constrain_batch(batch)
        args, kwargs = model_args(inputs, batch)
        if compute_dtype is not None:
            args, kwargs = jax.tree.map(
                lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                (args, kwargs),
            )
        logits = model.apply(state.variables, *args, train=False, **kwargs)
        logits = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), logits)
        n = jax.tree.leaves(batch)[0].shape[0]
        mask = jnp.asarray(batch["mask"], jnp.float32) if "mask" in batch else jnp.ones(n)
        count = jnp.sum(mask)
        if isinstance(loss_fn, losses_lib.Loss):
            loss = jnp.sum(loss_fn.per_example(logits, batch) * mask)
        else:
            loss = loss_fn(logits, batch) * count
        sums = {"count": count, "loss": loss}
        if num_classes:
            pred, true = _classes(logits, batch_labels(batch))
            for k in ks:
                if k == 1:
                    hit = pred == true
                else:
                    _, top = jax.lax.top_k(logits, k)
                    hit = jnp.any(top == true[:, None], axis=-1)
                sums[f"top_{k}"] = jnp.sum(hit * mask)
            size = max(num_classes, 2)
            sums["confusion"] = (
                jnp.zeros((size, size), jnp.int32).at[true, pred].add(mask.astype(jnp.int32))
            )
        if par.axis_name is not None:
            sums = jax.lax.psum(sums, par.axis_name)
        return sums

    return par.compile(step, out_axes=None)


def accumulate(total: Sums | None, sums: Sums) -> Sums:
    """``total + sums`` leaf by leaf (``sums`` when ``total`` is None)."""
    if total is None:
        return sums
    return jax.tree.map(jnp.add, total, sums)


def _to_numpy(x: Any) -> np.ndarray:
    # A replicated global array of a multi-process run is not fully addressable; any copy will do.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def finalize(sums: Sums) -> dict[str, Any]:
    """The metrics of summed statistics (from :func:`accumulate`).

    Returns:
      A dict of floats: ``loss`` (mean), ``count``, ``accuracy``, ``top_{k}``
      (for ``k > 1``), ``precision``, ``recall`` and ``f1`` (macro averages over
      the classes that occur as a label or a prediction, with 0 for a class
      never predicted, as ``sklearn.metrics.precision_recall_fscore_support``
      with ``average="macro"`` and ``zero_division=0``), and
      ``confusion_matrix``, an int64 numpy array ``[true, predicted]``.
    """
    sums = {k: _to_numpy(v) for k, v in sums.items()}
    count = float(sums["count"])
    denom = max(count, 1.0)
    out: dict[str, Any] = {"loss": float(sums["loss"]) / denom, "count": count}
    for key in sorted(k for k in sums if k.startswith("top_")):
        name = "accuracy" if key == "top_1" else key
        out[name] = float(sums[key]) / denom
    if "confusion" in sums:
        cm = sums["confusion"].astype(np.int64)
        tp = np.diag(cm).astype(np.float64)
        true = cm.sum(axis=1).astype(np.float64)
        pred = cm.sum(axis=0).astype(np.float64)
        present = (true > 0) | (pred > 0)
        precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
        recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
        pr = precision + recall
        f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(tp), where=pr > 0)
        if present.any():
            out["precision"] = float(precision[present].mean())
            out["recall"] = float(recall[present].mean())
            out["f1"] = float(f1[present].mean())
        else:
            out["precision"] = out["recall"] = out["f1"] = 0.0
        out["confusion_matrix"] = cm
    return out
