"""The train step: differentiate the trainable parameters only, with frozen ones as constants.

:func:`make_train_step` builds a pure function ``(state, batch) -> (state,
metrics)``, compiled once with the state's buffers donated. The frozen half of
the parameters enters the loss as a constant, so JAX never builds the backward
pass through a frozen trunk and XLA runs only its forward pass. BatchNorm layers
whose scale and bias are frozen use and keep their running statistics (Keras's
convention; ``freeze_bn=False`` gives PyTorch's). :func:`make_staged_train_step`
runs :class:`jft.partition.Stages` (gradual unfreezing), compiling once per
stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jft import partition

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], jax.Array | tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", dict[str, jax.Array]]]


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
    """

    step: jax.Array
    trainable: dict[str, Any]
    frozen: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: Any
    rng: jax.Array

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
    )


def _learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    # Learning rates of optimizers built with optax.inject_hyperparams, named by rule.
    found = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if not (
            len(key_path) >= 2
            and key_path[-1] == jax.tree_util.DictKey("learning_rate")
            and key_path[-2] == jax.tree_util.GetAttrKey("hyperparams")
        ):
            continue
        # Name it by its rule: the index that follows PartitionState.inner_states.
        names = [
            str(b.idx)
            for a, b in zip(key_path, key_path[1:], strict=False)
            if a == jax.tree_util.GetAttrKey("inner_states")
            and isinstance(b, jax.tree_util.SequenceKey)
        ]
        found["/".join(names) or str(len(found))] = leaf
    if len(found) == 1:
        return {"lr": next(iter(found.values()))}
    return {f"lr/{name}": lr for name, lr in found.items()}


def _model_inputs(
    inputs: str | Callable[[Batch], Any], batch: Batch
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, str):
        return (batch[inputs],), {}
    args = inputs(batch)
    if isinstance(args, Mapping):
        return (), dict(args)
    if isinstance(args, tuple):
        return args, {}
    return (args,), {}


def make_train_step(
    model: nn.Module,
    rules: partition.Rules,
    loss_fn: LossFn,
    *,
    inputs: str | Callable[[Batch], Any] = "image",
    freeze_bn: bool = True,
    learning_rate: optax.ScalarOrSchedule | None = None,
    jit: bool = True,
    donate: bool = True,
) -> StepFn:
    """Builds the train step ``(state, batch) -> (state, metrics)`` for ``rules``.

    Only ``state.trainable`` is differentiated; ``state.frozen`` enters as a
    constant, so no gradient (and no backward compute) exists for it. The step is
    pure, so it also runs under a device mesh with sharded batches.

    Args:
      model: a flax module called as ``model.apply(variables, *args, train=True)``.
      rules: the ``(regex, optimizer_or_None)`` pairs the state was created with.
      loss_fn: ``loss_fn(model_output, batch)`` returning a scalar loss, or
        ``(loss, metrics)`` with more scalar metrics to report.
      inputs: the batch key of the model's single input, or ``batch -> args``
        returning a value, a tuple of positional arguments, or a dict of keyword
        arguments.
      freeze_bn: if on (Keras's convention), BatchNorm layers whose scale and
        bias are frozen use their running statistics and do not update them; the
        model must have a ``frozen_bn`` attribute. If off (PyTorch's), they
        normalise with batch statistics and update the running ones.
      learning_rate: reported as ``metrics["lr"]`` (a schedule is evaluated at
        ``state.step``). Without it, the learning rates of optimizers built with
        ``optax.inject_hyperparams`` are reported.
      jit: return ``jax.jit(step)``, else the plain function.
      donate: donate the state's buffers to the step (with ``jit``).

    Returns:
      The step. Its metrics: ``loss``, ``grad_norm``, ``update_norm``,
      ``param_norm`` (of the trainable parameters), learning rates, and the
      metrics of ``loss_fn``.
    """
    tx = partition.optimizer(rules)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        args, kwargs = _model_inputs(inputs, batch)
        rng = jax.random.fold_in(state.rng, state.step)
        has_bn = bool(state.batch_stats)
        # Only the paths matter here, so this runs once, at trace time.
        model_ = _with_frozen_bn(model, state, rules) if freeze_bn and has_bn else model

        def loss_of(trainable):
            variables = {"params": partition.merge(trainable, state.frozen)}
            if has_bn:
                variables["batch_stats"] = state.batch_stats
            out = model_.apply(
                variables,
                *args,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"] if has_bn else False,
                **kwargs,
            )
            batch_stats = state.batch_stats
            if has_bn:
                out, updated = out
                batch_stats = dict(updated["batch_stats"])
            loss = loss_fn(out, batch)
            aux = {}
            if isinstance(loss, tuple):
                loss, aux = loss
            return loss, (batch_stats, aux)

        (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.trainable
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "update_norm": optax.global_norm(updates),
            "param_norm": optax.global_norm(trainable),
            **aux,
        }
        if learning_rate is None:
            metrics.update(_learning_rates(opt_state))
        elif callable(learning_rate):
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        else:
            metrics["lr"] = jnp.asarray(learning_rate, jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            trainable=trainable,
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=0 if donate else ())


def _with_frozen_bn(model: nn.Module, state: TrainState, rules: partition.Rules) -> nn.Module:
    patterns = partition.frozen_bn_patterns(state.params, state.batch_stats, rules)
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
