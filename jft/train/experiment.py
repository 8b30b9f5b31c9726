"""What a resolved config builds, once, for training and evaluation alike.

:meth:`Experiment.build` reads the data set's description and builds the model,
the partition rules, the loss and the model's inputs; from it come the initial
variables, a fresh state, the train and eval steps for a
:class:`jft.train.parallel.Parallel`, the data pipelines and a whole evaluation.
``jft train`` (:mod:`jft.train.loop`) and ``jft eval``
(:func:`jft.train.evaluate`) build through it, so they build the same things.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import data, partition
from jft.train import config as config_lib
from jft.train import losses, metrics
from jft.train.inputs import TEXT_KEYS, inputs_for
from jft.train.parallel import Parallel
from jft.train.state import TrainState, create_train_state
from jft.train.step import make_train_step

__all__ = ["Experiment"]


def _example(features: Mapping[str, Any], keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        shape, dtype = features[k]
        out[k] = np.zeros((1, *shape), dtype)
    return out


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The model, rules, loss and inputs of one resolved run config.

    Attributes:
      config: the resolved config (:func:`jft.train.config.resolve`).
      info: the data set's description (:func:`jft.data.info`).
      model: the flax module, computing in ``config.compute_dtype``.
      rules: the partition rules (:func:`jft.train.config.build_rules`).
      loss_fn: the loss of ``config.loss``.
      inputs: the batch key of the model's input, or ``batch -> kwargs``.
      compute_dtype: ``jnp.bfloat16`` or ``None`` (float32).
    """

    config: ml_collections.ConfigDict
    info: Any
    model: Any
    rules: partition.Rules
    loss_fn: Callable[..., Any]
    inputs: str | Callable[[Any], Any]
    compute_dtype: Any

    @classmethod
    def build(cls, config: ml_collections.ConfigDict) -> Experiment:
        """Builds what ``config`` (resolved) describes; nothing is compiled or written.

        Raises:
          jft.train.ConfigError, jft.data.DataError: a user mistake, in one line.
        """
        info = data.info(config.data)
        compute_dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
        model = config_lib.build_model(config, info.num_classes, compute_dtype)
        loss = {k: v for k, v in config.loss.items() if k != "name"}
        return cls(
            config=config,
            info=info,
            model=model,
            rules=config_lib.build_rules(config),
            loss_fn=losses.get(config.loss.name, **loss),
            inputs=inputs_for(info.features),
            compute_dtype=compute_dtype,
        )

    def init_variables(self) -> dict[str, Any]:
        """The model's initial variables (seeded by ``config.seed``), as numpy arrays."""
        features, inputs = self.info.features, self.inputs
        if isinstance(inputs, str):
            example = _example(features, [inputs])
            args, kwargs = (example[inputs],), {}
        else:
            example = _example(features, [k for k in TEXT_KEYS if k in features])
            args, kwargs = (), inputs(example)
        init = jax.jit(lambda rng: self.model.init(rng, *args, train=False, **kwargs))
        variables = init(jax.random.PRNGKey(self.config.seed))
        return jax.tree.map(np.asarray, dict(variables))

    def state(self, variables: Mapping[str, Any]) -> TrainState:
        """A fresh :class:`TrainState` of ``variables`` under the rules; a restore template."""
        return create_train_state(variables, self.rules, rng=self.config.seed)

    def train_step(self, parallel: Parallel) -> Callable[..., Any]:
        """The compiled train step of the config under ``parallel``."""
        return make_train_step(
            self.model,
            self.rules,
            self.loss_fn,
            inputs=self.inputs,
            learning_rate=config_lib.learning_rate(self.config),
            parallel=parallel,
            grad_accum_steps=self.config.grad_accum_steps,
            compute_dtype=self.compute_dtype,
        )

    def eval_step(self, parallel: Parallel) -> Callable[..., Any]:
        """The compiled eval step (sums of the eval metrics) under ``parallel``."""
        return metrics.make_eval_step(
            self.model,
            loss_fn=self.loss_fn,
            inputs=self.inputs,
            num_classes=self.info.num_classes,
            parallel=parallel,
        )

    def train_data(self) -> Any:
        """The train split's pipeline (a grain iterator source with ``get_state``/``set_state``)."""
        config = self.config
        return data.get(config.data, config.data.train_split, train=True, seed=config.seed)

    def evaluate(self, eval_step: Callable[..., Any], state: Any, parallel: Parallel) -> dict:
        """The eval metrics of ``state`` over the whole eval split (``{}`` if it is empty)."""
        config = self.config
        pipeline = data.get(config.data, config.data.eval_split, train=False, seed=config.seed)
        total = None
        for batch in pipeline:
            sums = eval_step(state, parallel.shard_batch(batch))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        return {} if total is None else metrics.finalize(total)
