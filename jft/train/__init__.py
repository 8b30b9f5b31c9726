"""Training: the train state and a pure train step that differentiates trainable parameters only."""

from jft.train import checkpoint, distributed, losses, metrics, parallel
from jft.train.checkpoint import Checkpointer, CheckpointError, Restored, read_metadata
from jft.train.config import ConfigError, default_config
from jft.train.export import export
from jft.train.inputs import inputs_for, model_args
from jft.train.loop import NonFiniteError, evaluate, train_and_evaluate
from jft.train.metrics import make_eval_step
from jft.train.parallel import host_state, make_mesh, place_state, shard_batch
from jft.train.step import (
    StagedTrainStep,
    TrainState,
    create_train_state,
    make_staged_train_step,
    make_train_step,
    restage,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "Restored",
    "StagedTrainStep",
    "TrainState",
    "checkpoint",
    "create_train_state",
    "default_config",
    "distributed",
    "evaluate",
    "export",
    "host_state",
    "inputs_for",
    "losses",
    "make_staged_train_step",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "metrics",
    "model_args",
    "parallel",
    "place_state",
    "read_metadata",
    "restage",
    "shard_batch",
    "train_and_evaluate",
]
