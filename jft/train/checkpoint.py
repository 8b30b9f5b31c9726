"""Training checkpoints, as :mod:`jft.train` names them: the names of :mod:`jft.checkpoint`.

The code lives in :mod:`jft.checkpoint`, below :mod:`jft.weights` (which reads
runs as weights) and :mod:`jft.train`: the manager (:class:`Checkpointer`), the
checksums, the metadata ``jft inspect`` shows, and the model-free reading of a
run's variables (:func:`read_params`, which is :func:`jft.weights.read_checkpoint`).
"""

import jft.checkpoint
from jft.checkpoint import *  # noqa: F403 (the same names, listed once, in jft.checkpoint)
from jft.checkpoint.checksums import checksums
from jft.weights.readers import read_checkpoint as read_params

__all__ = [*jft.checkpoint.__all__, "checksums", "read_params"]
