"""jft: fine-tune pretrained models in JAX."""

from jft import data, models, optim, partition, train, weights

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "models",
    "optim",
    "partition",
    "train",
    "weights",
]
