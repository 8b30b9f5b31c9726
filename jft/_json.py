"""The one reader of the small JSON files jft takes from users (``config.json`` and friends)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["read_object"]


def read_object(path: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
      path: the file.
      error: the caller's error type (``WeightsError``, ``DataError``).

    Raises:
      error: one line naming ``path``: unreadable, not JSON, or not an object.
    """
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError too
        raise error(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(out, dict):
        raise error(f"{path}: not a JSON object")
    return out
