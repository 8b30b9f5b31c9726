"""The one error type of `jft.data`."""


class DataError(ValueError):
    """A data set, split, folder or config key that cannot be used; the message is one line."""
