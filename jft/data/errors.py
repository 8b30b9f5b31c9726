"""The one error type of `jft.data`."""

from jft.errors import JftError

__all__ = ["DataError"]


class DataError(JftError, ValueError):
    """A data set, split, folder or config key that cannot be used; the message is one line."""
