"""One name -> object table, the one way jft looks up a thing a recipe names by string.

Models (:mod:`jft.models.registry`), weight key maps (:mod:`jft.weights.keymaps`),
losses (:mod:`jft.train.losses`) and optimizers (``config.optimizer.name``) are each
a :class:`Registry`, so an unknown name gives the same one line everywhere:
``unknown model 'resnet19' (model.name); known: bert, cnn, ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from jft.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind, filled by :meth:`register` or given whole.

    Args:
      kind: what a name names, for the error (``"model"``, ``"arch"``, ``"loss"``).
      entries: the table, when it is known up front.
    """

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that files the object under ``name``.

        The same function imported twice (pytest's importlib mode) files again; a
        different object under a taken name is a bug and raises ``ValueError``.
        """

        def wrap(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and _origin(old) != _origin(obj):
                raise ValueError(f"{self.kind} {name!r} is already registered by {_origin(old)[0]}")
            self._entries[name] = obj
            return obj

        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(
        self, name: str, *, key: str | None = None, error: type[Exception] = UnknownNameError
    ) -> T:
        """The object filed under ``name``.

        Args:
          name: the name to look up.
          key: where the name came from (``"model.name"``, ``"--arch"``), for the message.
          error: the exception class to raise, for callers whose errors have their own
            type (a ``ConfigError``); ``UnknownNameError`` unless given.

        Raises:
          UnknownNameError: (or ``error``) one line naming ``name`` and the known names.
        """
        if name not in self._entries:
            raise error(self.unknown(name, key=key))
        return self._entries[name]

    def unknown(self, name: str, *, key: str | None = None) -> str:
        """The one-line message for an unknown ``name``."""
        where = f" ({key})" if key else ""
        return f"unknown {self.kind} {name!r}{where}; known: {', '.join(self.names())}"


def _origin(obj: object) -> tuple[str, str]:
    """Where ``obj`` (a tuple: its first item) was defined, to tell a re-import from a clash."""
    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    return getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj))
