"""How the ``jft`` command reports a failure: one line for a user's mistake, a traceback for a bug.

A user-facing failure is any :class:`jft.errors.JftError` (an unknown config
key, a broken recipe, a wrong shape) or an ``OSError`` (a missing or unwritable
file); anything else is a bug in jft and keeps its traceback.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

from jft.errors import JftError

__all__ = ["UserError", "finish_output", "quiet", "user_message"]


class UserError(JftError):
    """A mistake on the command line; printed as one line."""


def user_message(error: BaseException) -> str | None:
    """The one line printed for a user-facing error; None for a bug (keeps its traceback)."""
    if isinstance(error, JftError):
        return " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None:
        paths = " -> ".join(repr(os.fsdecode(f)) for f in (error.filename, error.filename2) if f)
        return f"{paths}: {error.strerror or error}"
    if isinstance(error, OSError):
        return " ".join(str(error).split()) or type(error).__name__
    return None


def finish_output(error: BaseException) -> None:
    """Lets whatever the failed command left open (a progress bar) print before the error.

    An open tqdm bar lives in a frame of the traceback and prints its last state when
    it is freed, which would come after the error line: free those frames now.
    """
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()


def quiet() -> None:
    # Library chatter (tfds' "OpenCV is not installed", orbax's notices, TF's C++ logs)
    # buries the lines a user needs: keep errors only.
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.ERROR)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    # A failed asynchronous save (a full disk) is reported as one line by the
    # checkpoint code; asyncio would also log each of orbax's unretrieved futures,
    # from a garbage-collector pass at a moment nobody controls.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # preparing the digits takes a second: no bars for that
