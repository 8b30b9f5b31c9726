"""Training: the train state and a pure train step that differentiates trainable parameters only."""

from jft.train import distributed, losses, metrics, parallel
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
    "StagedTrainStep",
    "TrainState",
    "create_train_state",
    "distributed",
    "host_state",
    "losses",
    "make_staged_train_step",
    "make_mesh",
    "make_train_step",
    "metrics",
    "parallel",
    "place_state",
    "restage",
    "shard_batch",
]
