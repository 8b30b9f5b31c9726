"""jft: fine-tune pretrained models in JAX."""

from jft import optim, partition, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "optim",
    "partition",
    "train",
]
