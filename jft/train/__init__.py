"""Training: the train state and a pure train step that differentiates trainable parameters only."""

from jft.train import checkpoint, distributed, losses, metrics, parallel
from jft.train.checkpoint import Checkpointer, CheckpointError, Restored, read_metadata
from jft.train.config import ConfigError, default_config
from jft.train.export import export
from jft.train.inputs import inputs_for, model_args
from jft.train.loop import NonFiniteError
from jft.train.main import evaluate, train_and_evaluate
from jft.train.metrics import make_eval_step
from jft.train.parallel import Parallel, host_state, make_mesh, place_state, shard_batch
from jft.train.state import TrainState, create_train_state
from jft.train.step import make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "Parallel",
    "Restored",
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
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "metrics",
    "model_args",
    "parallel",
    "place_state",
    "read_metadata",
    "shard_batch",
    "train_and_evaluate",
]
