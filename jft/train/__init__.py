"""Training: the train state and a pure train step that differentiates trainable parameters only."""

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
    "make_staged_train_step",
    "make_train_step",
    "restage",
]
