"""orbax's and tensorstore's failures, told in one line, and their noise kept off the terminal.

A full disk or a damaged file makes orbax log tracebacks from its threads and
tensorstore print "Event loop is closed" for every future it completes late;
jft reports the failure itself, once, so both are dropped unless
``JFT_DEBUG=1``.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

__all__ = ["is_io_error", "none_restored", "quiet_orbax", "reason", "why_written_failed"]


def _debug() -> bool:
    return os.environ.get("JFT_DEBUG", "") not in ("", "0")


def is_io_error(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a failure of the file system, not a bug."""
    seen = 0
    while e is not None and seen < 20:
        text = str(e)
        if isinstance(e, OSError) or "os_error_code=" in text or "RESOURCE_EXHAUSTED" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def why_written_failed(e: BaseException) -> str:
    """Why a write failed, in a few words: "the disk is full", "a read-only file system"..."""
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        known = {errno.ENOSPC: "the disk is full", errno.EROFS: "a read-only file system"}
        why = known.get(
            cause.errno, f"{cause.strerror or type(cause).__name__}: {cause.filename or ''}".strip()
        )
    else:
        why = reason(e)
    text = str(cause)  # tensorstore reports the errno inside a ValueError
    if "No space left on device" in text or "os_error_code='28'" in text:
        why = "the disk is full"
    elif "Read-only file system" in text or "os_error_code='30'" in text:
        why = "a read-only file system"
    return why


def reason(e: BaseException) -> str:
    """``e`` as one short line: its type and the first line of its message."""
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= 240 else text[:237] + "..."


class _OrbaxErrorsReported(logging.Filter):
    """Drops orbax's error logs (tracebacks of its threads): jft raises them as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _debug():
            return True
        # absl names itself as the caller of logging.exception: orbax's lines also
        # start with "[process=N]".
        from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "") or str(
            record.msg
        ).startswith("[process=")
        return not from_orbax


_ORBAX_FILTER = _OrbaxErrorsReported()


def _quiet_closed_loops() -> None:
    # After a failed read or write, tensorstore completes its futures on event loops
    # that orbax has already closed; Python prints each as an unraisable traceback
    # (dozens of lines) although nothing is lost.
    previous = sys.unraisablehook
    if getattr(previous, "_jft", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not _debug() and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jft = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def quiet_orbax() -> None:
    """Installs both filters (once); called before orbax reads or writes."""
    absl_logger = logging.getLogger("absl")
    if _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)
    _quiet_closed_loops()


def none_restored(directory: str, failures: list[tuple[int, str]]) -> str:
    """The one line for a directory none of whose steps could be restored."""
    first_s, first_reason = failures[0]
    others = ", ".join(str(s) for s, _ in failures[1:])
    return (
        f"checkpoint {directory}: no step could be restored: step {first_s} is damaged "
        f"({first_reason})"
        + (f", and so are steps {others}" if others else "")
        + f"; move {directory} aside to start over"
    )
