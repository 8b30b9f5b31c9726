"""A split of token rows (SFT examples, a text corpus) as :mod:`jft.data.pipeline` reads it."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Source", "TokenRows"]


@dataclasses.dataclass(frozen=True)
class Source:
    """The data set behind the rows: its name (for messages) and no pixels."""

    name: str
    pixel_max: float = 1.0


@dataclasses.dataclass
class TokenRows:
    """One split, tokenized and cut into rows.

    The interface of :mod:`jft.data.pipeline`'s splits: ``indices`` (one per row),
    ``dataset``, ``features``, ``batch(ops, rows, ctx)``.

    Attributes:
      dataset: where the rows come from (``dataset.name``).
      columns: ``input_ids``, ``attention_mask``, ``loss_mask`` ``(rows, max_length)``.
      num_documents: the examples or documents in the split.
    """

    dataset: Source
    columns: dict[str, np.ndarray]
    num_documents: int

    @property
    def indices(self) -> np.ndarray:
        """One index per row."""
        return np.arange(len(self.columns["input_ids"]))

    @property
    def features(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """key -> (shape, dtype) of one row."""
        return {k: (v.shape[1:], v.dtype) for k, v in self.columns.items()}

    def batch(self, ops, rows: np.ndarray, ctx) -> dict[str, np.ndarray]:
        """The rows ``rows``: token rows take no preprocessing ops."""
        del ops, ctx
        return {k: v[rows] for k, v in self.columns.items()}
