"""The one base class of jft's user-facing errors.

Every mistake a user can make (a config key, a file, a tensor, a path) and every
fault jft detects (a damaged checkpoint, non-finite values, a locked workdir)
raises a subclass of :class:`JftError` whose message is one line that names the
thing and says what to do. The ``jft`` command prints that line and exits with
status 2; it prints a traceback only when asked (``--debug`` or ``JFT_DEBUG=1``).

This module imports nothing, so every layer of jft can subclass it.
"""

from __future__ import annotations

__all__ = ["JftError", "UnknownNameError"]


class JftError(Exception):
    """A user-facing jft error; its message is one line naming the problem and the fix."""


class UnknownNameError(JftError, ValueError):
    """A name no registry holds (model, key map, loss, optimizer); the message lists the known."""
