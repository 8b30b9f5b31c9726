r"""The classic MLP on MNIST: 784-128-10 with Adam.

MNIST is a tensorflow-datasets catalog data set: prepare it once on a machine
with internet (``--config.data.download=True``, or ``tfds build mnist
--data_dir D`` then ``--config.data.data_dir=D``); offline and unprepared it
fails at once with that advice.

Run:

    jft train --config configs/mnist_mlp.py --workdir runs/mnist_mlp --config.data.download=True

Result: not measured on our machines (no internet for the download); this MLP
is known to reach ~0.98 test accuracy in a few epochs.
"""

import ml_collections

from jft.train import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The MNIST MLP; ``arg`` is unused."""
    del arg
    c = default_config()
    c.description = "MLP 784-128-10 on MNIST, Adam"
    # Data
    c.data.name = "mnist"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.batch_size = 128
    c.data.eval_batch_size = 1000
    # Model
    c.model = ml_collections.ConfigDict({"name": "mlp", "widths": (128,), "num_classes": 10})
    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    # Schedule
    c.schedule.name = "constant"
    c.num_steps = 2000  # ~4 epochs of 469 batches
    c.eval_every = 500
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 500
    return c
