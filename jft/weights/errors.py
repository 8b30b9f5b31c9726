"""The error of jft.weights: a weights file that cannot be read or does not fit the model."""

from __future__ import annotations

import os

from jft.errors import JftError

__all__ = ["WeightsError", "fail", "first_line"]


class WeightsError(JftError, ValueError):
    """A weights file does not fit the model; the message says where and how."""


def fail(path: str | os.PathLike, problem: str) -> WeightsError:
    """A WeightsError naming ``path``, in one line whatever the underlying library said."""
    problem = " ".join(str(problem).split())
    if len(problem) > 300:
        problem = problem[:297] + "..."
    return WeightsError(f"{os.fspath(path)}: {problem}")


def first_line(msg: str) -> str:
    """The first non-empty line of a library's message."""
    lines = [s.strip() for s in msg.strip().splitlines() if s.strip()]
    return lines[0] if lines else "unknown error"
