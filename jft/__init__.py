"""jft: fine-tune pretrained models in JAX."""

from jft import models, optim, partition, train, weights

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "models",
    "optim",
    "partition",
    "train",
    "weights",
]
