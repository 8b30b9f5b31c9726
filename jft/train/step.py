"""The train step: differentiate the trainable parameters only, with frozen ones as constants.

:func:`make_train_step` builds a pure function ``(state, batch) -> (state,
metrics)``, compiled once with the state's buffers donated. The frozen half of
the parameters enters the loss as a constant, so JAX never builds the backward
pass through a frozen trunk and XLA runs only its forward pass. BatchNorm layers
whose scale and bias are frozen use and keep their running statistics (Keras's
convention; ``freeze_bn=False`` gives PyTorch's). :func:`make_staged_train_step`
runs :class:`jft.partition.Stages` (gradual unfreezing), compiling once per
stage.

The same step runs on one device (``parallel="none"``), data parallel under
``jax.jit`` over a device mesh (``"jit"``, optionally with FSDP-sharded
parameters and optimizer state) or under ``jax.pmap`` (``"pmap"``); see
:mod:`jft.train.parallel` for placing the state and the batches. It can
accumulate gradients over microbatches, compute in bfloat16 with float32
parameters, and skips (and counts) steps whose loss, gradients, update or new
parameters are not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jft import ops, optim, partition
from jft.models.frozen_bn import frozen_bn_patterns
from jft.train import parallel as parallel_lib
from jft.train._jit import OptionsJit
from jft.train.inputs import model_args
from jft.train.parallel import AXIS

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", dict[str, jax.Array]]]

PARALLEL_MODES = ("none", "jit", "pmap")


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


def _cross_replica_batch_norm(axis_name: str) -> Callable[..., Any]:
    """A flax method interceptor: BatchNorm layers reduce their statistics over ``axis_name``.

    Under ``pmap`` each device sees its shard of the batch; with this, BatchNorm
    normalizes with the statistics of the global batch (``nn.BatchNorm``'s
    ``axis_name``), as one device and the mesh path do. The layers are built
    fresh at each ``apply``, so setting the field on the bound instance changes
    nothing outside this trace.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and module.axis_name is None:
            object.__setattr__(module, "axis_name", axis_name)
        return next_fun(*args, **kwargs)

    return interceptor


def make_train_step(
    model: nn.Module,
    rules: partition.Rules,
    loss_fn: LossFn,
    *,
    inputs: str | Callable[[Batch], Any] | None = None,
    freeze_bn: bool = True,
    learning_rate: optax.ScalarOrSchedule | None = None,
    parallel: str = "none",
    mesh: Mesh | None = None,
    fsdp: bool = False,
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    jit: bool = True,
    donate: bool = True,
    norms: bool = True,
) -> StepFn:
    """Builds the train step ``(state, batch) -> (state, metrics)`` for ``rules``.

    Only ``state.trainable`` is differentiated; ``state.frozen`` enters as a
    constant, so no gradient (and no backward compute) exists for it.

    Parallel modes (place the state with :func:`jft.train.parallel.place_state`
    and each batch with :func:`jft.train.parallel.shard_batch`):

    - ``"none"``: ``jax.jit`` on one device.
    - ``"jit"``: ``jax.jit`` over ``mesh`` (default: every device on one ``"data"``
      axis); the batch is sharded over the axis, the state replicated, or with
      ``fsdp`` the large parameter and optimizer-state leaves are sharded over
      the same axis (XLA gathers them for the forward pass and reduce-scatters
      the gradients). BatchNorm statistics are those of the global batch.
    - ``"pmap"``: ``jax.pmap`` over the local devices, the state replicated with
      a leading device axis; gradients, metrics and BatchNorm statistics are
      averaged over the ``"data"`` axis (``nn.BatchNorm.axis_name``), so the
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
      parallel: ``"none"``, ``"jit"`` or ``"pmap"``.
      mesh: the device mesh of ``"jit"`` (:func:`jft.train.parallel.make_mesh`).
      fsdp: shard parameters and optimizer state over the mesh (``"jit"`` only);
        the state must be placed with the same ``fsdp``.
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
      ValueError: an unknown ``parallel``, ``fsdp`` without ``"jit"``, or
        ``grad_accum_steps < 1``.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if fsdp and parallel != "jit":
        raise ValueError(f"fsdp=True needs parallel='jit', got parallel={parallel!r}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if compute_dtype is not None:
        compute_dtype = jnp.dtype(compute_dtype)
        if hasattr(model, "dtype") and model.dtype != compute_dtype:
            model = model.clone(dtype=compute_dtype)
    if parallel == "jit" and mesh is None:
        mesh = parallel_lib.make_mesh()
    axis_name = AXIS if parallel == "pmap" else None
    tx = partition.optimizer(rules)
    k = grad_accum_steps

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if parallel == "jit":
            batch = parallel_lib.constrain_batch(batch, mesh)
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # independent dropout masks on each device's rows
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        has_bn = bool(state.batch_stats)
        # Only the paths matter here, so this runs once, at trace time.
        model_ = _with_frozen_bn(model, state, rules) if freeze_bn and has_bn else model

        def grads_of(batch_stats, batch, rng):
            args, kwargs = model_args(inputs, batch)
            if compute_dtype is not None:
                args, kwargs = _cast_floats((args, kwargs), compute_dtype)

            def loss_of(trainable):
                variables = {"params": partition.merge(trainable, state.frozen)}
                if has_bn:
                    variables["batch_stats"] = batch_stats
                out = model_.apply(
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

            if axis_name is not None and has_bn:
                with nn.intercept_methods(_cross_replica_batch_norm(axis_name)):
                    return _value_and_grad(loss_of, state.trainable)
            return _value_and_grad(loss_of, state.trainable)

        if k == 1:
            loss, (batch_stats, aux), grads = grads_of(state.batch_stats, batch, rng)
        else:
            micro = _microbatches(batch, k)
            if parallel == "jit":
                micro = parallel_lib.constrain_batch(micro, mesh, batch_axis=1)

            def body(carry, xs):
                batch_stats, grad_sum = carry
                i, mb = xs
                loss, (batch_stats, aux), grads = grads_of(
                    batch_stats, mb, jax.random.fold_in(rng, i)
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (batch_stats, grad_sum), (loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (batch_stats, grads), (losses, auxes) = jax.lax.scan(
                body, (state.batch_stats, zeros), (jnp.arange(k), micro)
            )
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = jnp.mean(losses)
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)

        if axis_name is not None:
            grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
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
        metrics = {"loss": loss, "nonfinite": nonfinite, **aux}
        if norms:
            metrics["grad_norm"] = optax.global_norm(seen)
            metrics["update_norm"] = update_norm
            metrics["param_norm"] = optax.global_norm(ops.optimization_barrier(trainable))
        if learning_rate is None:
            metrics.update(_learning_rates(opt_state))
        elif callable(learning_rate):
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        else:
            metrics["lr"] = jnp.asarray(learning_rate, jnp.float32)
        if axis_name is not None:
            # Every value is the same on each device by now; pmax marks it so, for out_axes=None.
            metrics = jax.lax.pmax(metrics, axis_name)
        if parallel == "jit":
            new_state = jax.lax.with_sharding_constraint(
                new_state, parallel_lib.state_shardings(new_state, mesh, fsdp=fsdp)
            )
        return new_state, metrics

    donate_argnums = 0 if donate else ()
    if parallel == "pmap":
        return jax.pmap(step, axis_name=AXIS, donate_argnums=donate_argnums, out_axes=(0, None))
    # jax.pmap takes no compiler options: under pmap the CPU runs XLA's defaults.
    if parallel == "jit":
        return OptionsJit(step, donate_argnums=donate_argnums)
    if not jit:
        return step
    return OptionsJit(step, donate_argnums=donate_argnums)


def _value_and_grad(loss_of, trainable):
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    return loss, aux, grads


def _with_frozen_bn(model: nn.Module, state: TrainState, rules: partition.Rules) -> nn.Module:
    patterns = frozen_bn_patterns(state.params, state.batch_stats, partition.is_frozen(rules))
    if not patterns:
        return model
    if not hasattr(model, "frozen_bn"):
        raise ValueError(
            f"{type(model).__name__} has no frozen_bn attribute, so its frozen BatchNorm "
            "layers cannot keep their statistics; pass freeze_bn=False"
        )
    return model.clone(frozen_bn=tuple(model.frozen_bn) + patterns)


def restage(
    state: TrainState, old_rules: partition.Rules, new_rules: partition.Rules
) -> TrainState:
    """Moves ``state`` from ``old_rules`` to ``new_rules`` (a stage change).

    Parameters move between the trainable and frozen halves; optimizer state is
    kept where :func:`jft.partition.carry_over` can keep it and initialised for
    newly trainable parameters.
    """
    trainable, frozen = partition.split(state.params, new_rules)
    opt_state = partition.carry_over(old_rules, state.opt_state, new_rules, trainable)
    return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state)


class StagedTrainStep:
    """A train step over :class:`jft.partition.Stages`, compiled once per stage.

    Call it as ``state, metrics = step(state, batch)``. Before each step it reads
    ``state.step`` (a host sync); when that enters a new stage, it moves the
    state to the new rules with :func:`restage` and uses that stage's step,
    built and compiled on first use. Start from
    ``create_train_state(variables, stages.rules_at(step))``.

    Attributes:
      stages: the :class:`jft.partition.Stages`.
      steps: the step function of each stage built so far, by stage index.
    """

    def __init__(self, model: nn.Module, stages: partition.Stages, loss_fn: LossFn, **kwargs):
        self.stages = stages
        self.steps: dict[int, StepFn] = {}
        self._build = lambda rules: make_train_step(model, rules, loss_fn, **kwargs)
        self._stage: int | None = None

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One train step, first changing stage if ``state.step`` starts a new one."""
        k = self.stages.index(int(state.step))
        if self._stage is None:
            self._stage = k
        if k != self._stage:
            state = restage(state, self.stages.rules[self._stage], self.stages.rules[k])
            self._stage = k
        if k not in self.steps:
            self.steps[k] = self._build(self.stages.rules[k])
        return self.steps[k](state, batch)


def make_staged_train_step(
    model: nn.Module, stages: partition.Stages, loss_fn: LossFn, **kwargs: Any
) -> StagedTrainStep:
    """A :class:`StagedTrainStep`: :func:`make_train_step` per stage of ``stages``.

    ``kwargs`` go to :func:`make_train_step`.
    """
    return StagedTrainStep(model, stages, loss_fn, **kwargs)
