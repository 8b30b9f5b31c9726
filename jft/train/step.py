"""The train step: differentiate the trainable parameters only, with frozen ones as constants.

:func:`make_train_step` builds a pure function ``(state, batch) -> (state,
metrics)`` over a :class:`jft.train.TrainState`, compiled once with the state's
buffers donated. The frozen half of the parameters enters the loss as a
constant, so JAX never builds the backward pass through a frozen trunk and XLA
runs only its forward pass. BatchNorm layers whose scale and bias are frozen use
and keep their running statistics (Keras's convention; ``freeze_bn=False`` gives
PyTorch's).

The same step runs on one device, data parallel under ``jax.jit`` over a device
mesh (optionally with FSDP-sharded parameters and optimizer state) or under
``jax.pmap``, as a :class:`jft.train.parallel.Parallel` says. It can accumulate
gradients over microbatches, compute in bfloat16 with float32 parameters, and
skips (and counts) steps whose loss, gradients, update or new parameters are not
finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jft import ops, optim, partition
from jft.train import _batch_norm
from jft.train.inputs import model_args
from jft.train.parallel import Parallel
from jft.train.state import TrainState

__all__ = ["make_train_step"]

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# (batch_stats, batch, rng) -> (loss, new batch_stats, loss_fn's metrics, gradients)
GradFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Any, Metrics, Any]]


def _learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    # The learning rate of each rule, named by rule: an `lr` or `learning_rate`
    # hyperparameter of optax.inject_hyperparams, else the rate of a jft.optim
    # rule's LearningRateState (inside an injected rule, the hyperparameter wins).
    attr, key = jax.tree_util.GetAttrKey, jax.tree_util.DictKey
    is_rate = lambda x: isinstance(x, optim.LearningRateState)
    leaves = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_rate)[0]
    injected = [
        path[:-2]
        for path, _ in leaves
        if path[-2:]
        in ((attr("hyperparams"), key("lr")), (attr("hyperparams"), key("learning_rate")))
    ]
    found = {}
    for key_path, leaf in leaves:
        if is_rate(leaf):
            if any(key_path[: len(p)] == p for p in injected):
                continue
            leaf = leaf.learning_rate
        elif key_path[:-2] not in injected:
            continue
        # Name it by its rule: the index that follows PartitionState.inner_states.
        names = [
            str(b.idx)
            for a, b in zip(key_path, key_path[1:], strict=False)
            if a == attr("inner_states") and isinstance(b, jax.tree_util.SequenceKey)
        ]
        found["/".join(names) or str(len(found))] = jnp.real(leaf).astype(jnp.float32)
    if len(found) == 1:
        return {"lr": next(iter(found.values()))}
    return {f"lr/{name}": lr for name, lr in found.items()}


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Casts the floating leaves of ``tree`` to ``dtype``, leaving integers and bools alone."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        tree,
    )


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _microbatches(batch: Batch, k: int) -> Batch:
    """``(B, ...)`` leaves as ``(k, B // k, ...)``; microbatch ``m`` holds rows ``m, m + k, ...``.

    Strided rather than contiguous so that each microbatch takes the same rows of
    every device's shard: under a mesh the split needs no communication, and
    ``"none"``, ``"jit"`` and ``"pmap"`` group the same examples.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(
                f"a batch of {x.shape[0]} rows (per device under pmap) does not split into "
                f"grad_accum_steps={k} microbatches"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, dict(batch))


def _grad_fn(
    model: nn.Module,
    loss_fn: LossFn,
    state: TrainState,
    inputs: str | Callable[[Batch], Any] | None,
    compute_dtype: Any,
) -> GradFn:
    """The loss and the gradients of ``state.trainable`` on one (micro)batch."""
    has_bn = bool(state.batch_stats)

    def grads_of(batch_stats, batch, rng):
        args, kwargs = model_args(inputs, batch)
        if compute_dtype is not None:
            args, kwargs = _cast_floats((args, kwargs), compute_dtype)

        def loss_of(trainable):
            variables = {"params": partition.merge(trainable, state.frozen)}
            if has_bn:
                variables["batch_stats"] = batch_stats
            out = model.apply(
                variables,
                *args,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"] if has_bn else False,
                **kwargs,
            )
            new_stats = batch_stats
            if has_bn:
                out, updated = out
                new_stats = dict(updated["batch_stats"])
            if compute_dtype is not None:
                out = _cast_floats(out, jnp.float32)
            loss = loss_fn(out, batch)
            aux = {}
            if isinstance(loss, tuple):
                loss, aux = loss
            return loss, (new_stats, aux)

        (loss, (new_stats, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        return loss, new_stats, aux, grads

    return grads_of


def _accumulated(
    grads_of: GradFn, state: TrainState, batch: Batch, rng: jax.Array, k: int, par: Parallel
) -> tuple[jax.Array, Any, Metrics, Any]:
    """``grads_of`` averaged over ``k`` microbatches, run one after the other (``lax.scan``)."""
    if k == 1:
        return grads_of(state.batch_stats, batch, rng)
    micro = par.constrain_batch(_microbatches(batch, k), batch_axis=1)

    def body(carry, xs):
        batch_stats, grad_sum = carry
        i, mb = xs
        loss, batch_stats, aux, grads = grads_of(batch_stats, mb, jax.random.fold_in(rng, i))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (batch_stats, grad_sum), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    (batch_stats, grads), (losses, auxes) = jax.lax.scan(
        body, (state.batch_stats, zeros), (jnp.arange(k), micro)
    )
    grads = jax.tree.map(lambda g: g / k, grads)
    aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)
    return jnp.mean(losses), batch_stats, aux, grads


def _guarded_update(
    tx: optax.GradientTransformation,
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    batch_stats: Any,
    *,
    norms: bool,
) -> tuple[TrainState, Metrics]:
    """The optimizer's update, applied only if the loss, gradients, update and result are finite."""
    # On the CPU a barrier keeps XLA from fusing these reductions over the
    # gradients into the optimizer's elementwise passes (jft.ops).
    seen = ops.optimization_barrier(grads)
    # The guard covers the loss, the gradients, the update and the new parameters
    # (a zero-gradient Adam step with eps=0, lr=inf, NaN weights, an overflow all
    # leave the gradients finite). The update is computed here only to be checked:
    # XLA fuses it into the reduction, so the parameters are read once more and
    # nothing is written; the branch below computes it again, in place.
    trial, _ = tx.update(seen, state.opt_state, state.trainable)
    finite = (
        _all_finite(seen)
        & jnp.isfinite(loss)
        & _all_finite(optax.apply_updates(state.trainable, trial))
    )

    def apply(trainable, opt_state):
        updates, opt_state = tx.update(grads, opt_state, trainable)
        norm = optax.global_norm(updates) if norms else jnp.zeros((), jnp.float32)
        return optax.apply_updates(trainable, updates), opt_state, norm

    def skip(trainable, opt_state):
        return trainable, opt_state, jnp.full((), jnp.nan, jnp.float32)

    # A branch rather than a select between new and old values: XLA then
    # updates the parameters and optimizer state in place, where a select
    # keeps both and copies (60 ms against 12 for ResNet-18's Adam update).
    trainable, opt_state, update_norm = jax.lax.cond(
        finite, apply, skip, state.trainable, state.opt_state
    )
    nonfinite = jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        trainable=trainable,
        batch_stats=jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), batch_stats, state.batch_stats
        ),
        opt_state=opt_state,
        nonfinite=nonfinite,
    )
    metrics = {"nonfinite": nonfinite}
    if norms:
        metrics["grad_norm"] = optax.global_norm(seen)
        metrics["update_norm"] = update_norm
        metrics["param_norm"] = optax.global_norm(ops.optimization_barrier(trainable))
    return new_state, metrics


def _rate_metrics(
    learning_rate: optax.ScalarOrSchedule | None, step: jax.Array, opt_state: Any
) -> Metrics:
    if learning_rate is None:
        return _learning_rates(opt_state)
    if callable(learning_rate):
        return {"lr": jnp.asarray(learning_rate(step), jnp.float32)}
    return {"lr": jnp.asarray(learning_rate, jnp.float32)}


def make_train_step(
    model: nn.Module,
    rules: partition.Rules,
    loss_fn: LossFn,
    *,
    inputs: str | Callable[[Batch], Any] | None = None,
    freeze_bn: bool = True,
    learning_rate: optax.ScalarOrSchedule | None = None,
    parallel: Parallel | str = "none",
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    jit: bool = True,
    donate: bool = True,
    norms: bool = True,
) -> StepFn:
    """Builds the train step ``(state, batch) -> (state, metrics)`` for ``rules``.

    Only ``state.trainable`` is differentiated; ``state.frozen`` enters as a
    constant, so no gradient (and no backward compute) exists for it.

    Parallel modes (a :class:`jft.train.parallel.Parallel`, which also places
    the state and shards each batch; a mode name means ``Parallel(mode)``):

    - ``"none"``: ``jax.jit`` on one device.
    - ``"jit"``: ``jax.jit`` over the mesh (default: every device on one ``"data"``
      axis); the batch is sharded over the axis, the state replicated, or with
      ``fsdp`` the large parameter and optimizer-state leaves are sharded over
      the same axis (XLA gathers them for the forward pass and reduce-scatters
      the gradients). BatchNorm statistics are those of the global batch.
    - ``"pmap"``: ``jax.pmap`` over the local devices, the state replicated with
      a leading device axis; gradients, metrics and BatchNorm statistics are
      averaged over the ``"data"`` axis (the model's ``bn_axis_name``), so the
      step equals the one-device step on the global batch. Each device draws
      its dropout masks from the step's key folded with its index, so they
      are independent but differ from one device's (``"jit"`` draws the
      one-device masks).

    A step whose loss, gradients, update or new parameters are not finite (NaN
    or Inf) is skipped: the trainable
    parameters, optimizer state and BatchNorm statistics keep their values,
    ``state.nonfinite`` counts the skipped steps in a row (0 after a good step)
    and ``state.step`` still advances, so the next step draws a fresh dropout
    key and the learning-rate schedule moves on (the optimizer's own counters,
    as in ``optax.apply_if_finite``, do not). Stopping after too many skipped
    steps is the caller's choice (``metrics["nonfinite"]``).

    Args:
      model: a flax module called as ``model.apply(variables, *args, train=True)``.
      rules: the ``(regex, optimizer_or_None)`` pairs the state was created with.
      loss_fn: ``loss_fn(model_output, batch)`` returning a scalar mean loss, or
        ``(loss, metrics)`` with more scalar metrics to report (e.g. from
        :func:`jft.train.losses.get`).
      inputs: the batch key of the model's single input, or ``batch -> args``
        returning a value, a tuple of positional arguments, or a dict of keyword
        arguments; by default read off the batch's keys (a text model's
        ``input_ids``, ``attention_mask``, ``token_type_ids``, else ``image``;
        :func:`jft.train.inputs.model_args`). Targets are ``batch["label"]`` or
        Hugging Face's ``batch["labels"]``.
      freeze_bn: if on (Keras's convention), BatchNorm layers whose scale and
        bias are frozen use their running statistics and do not update them; the
        model must have a ``frozen_bn`` attribute. If off (PyTorch's), they
        normalise with batch statistics and update the running ones.
      learning_rate: reported as ``metrics["lr"]`` (a schedule is evaluated at
        ``state.step``). Without it, the learning rates of optimizers built with
        ``optax.inject_hyperparams`` are reported.
      parallel: a :class:`jft.train.parallel.Parallel` (mode, mesh, FSDP), or a
        mode name, ``"none"``, ``"jit"`` or ``"pmap"``; the state must be placed
        by the same one.
      grad_accum_steps: split each batch into this many microbatches, run them
        one after the other (``jax.lax.scan``) and average their gradients:
        the same update as the whole batch for a loss that is a mean over
        examples, with the activation memory of one microbatch. BatchNorm
        running statistics are updated once per microbatch, and normalise with
        each microbatch's statistics, so a model with BatchNorm differs slightly
        from one large batch. The batch (per device under pmap) must divide.
      compute_dtype: e.g. ``jnp.bfloat16``: floating model inputs are cast to it
        and a model with a ``dtype`` attribute computes in it; parameters,
        gradients, optimizer state and the loss stay float32 (the model output
        is cast to float32 before ``loss_fn``).
      jit: compile the step (``parallel="none"`` only), else the plain function.
      donate: donate the state's buffers to the step.
      norms: report ``grad_norm``, ``update_norm`` and ``param_norm``. Without
        them the step does what a plain PyTorch step does: on the CPU the
        update norm alone costs ResNet-18 about 10 ms (6%) a step, because the
        update must then be written out rather than fused into the
        parameters' in-place update.

    Returns:
      The step. Its metrics: ``loss``, ``grad_norm``, ``update_norm``,
      ``param_norm`` (of the trainable parameters; with ``norms``), learning rates,
      ``nonfinite`` (the state's counter after this step; > 0 means this step
      was skipped), and the metrics of ``loss_fn``. They are scalars in every
      mode (averaged over devices under ``pmap``).

    Raises:
      ValueError: an unknown ``parallel``, or ``grad_accum_steps < 1``.
    """
    par = Parallel.of(parallel)
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if compute_dtype is not None:
        compute_dtype = jnp.dtype(compute_dtype)
        if hasattr(model, "dtype") and model.dtype != compute_dtype:
            model = model.clone(dtype=compute_dtype)
    tx = partition.optimizer(rules)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = par.constrain_batch(batch)
        rng = jax.random.fold_in(state.rng, state.step)
        if par.axis_name is not None:  # independent dropout masks on each device's rows
            rng = jax.random.fold_in(rng, jax.lax.axis_index(par.axis_name))
        # Only the parameter paths are read here, so this runs once, at trace time.
        model_ = _batch_norm.for_step(
            model,
            state.params,
            state.batch_stats,
            rules,
            freeze_bn=freeze_bn,
            axis_name=par.axis_name,
        )
        grads_of = _grad_fn(model_, loss_fn, state, inputs, compute_dtype)
        loss, batch_stats, aux, grads = _accumulated(
            grads_of, state, batch, rng, grad_accum_steps, par
        )
        if par.axis_name is not None:
            grads, loss, aux = jax.lax.pmean((grads, loss, aux), par.axis_name)
        new_state, guard = _guarded_update(tx, state, grads, loss, batch_stats, norms=norms)
        metrics = {"loss": loss, **guard, **aux}
        metrics.update(_rate_metrics(learning_rate, state.step, new_state.opt_state))
        if par.axis_name is not None:
            # Every value is the same on each device by now; pmax marks it so, for out_axes=None.
            metrics = jax.lax.pmax(metrics, par.axis_name)
        return par.constrain_state(new_state), metrics

    if not jit and par.mode == "none":
        return step
    return par.compile(step, donate_argnums=0 if donate else (), out_axes=(0, None))
