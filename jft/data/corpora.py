"""Plain-text corpora that every Python install ships, as byte-level language-model rows.

``config.data.name = "corpus"`` and ``config.data.corpus`` one of:

- ``"stdlib"``: the source of the standard library's top-level modules
  (``Lib/*.py``, about 4.7 MB of code, comments and docstrings);
- ``"pydoc_topics"``: the Python language reference as ``help()`` shows it
  (``pydoc_data.topics``, 79 topics, about 0.46 MB of English prose).

Documents (a module, a topic) are sorted by name; every tenth document (the
10th, 20th, ...) forms the ``"test"`` split and the rest ``"train"``, so no
held-out text is seen in training. A split's documents are joined by a blank
line, encoded as UTF-8 bytes (the tokens, vocabulary 256: no tokenizer to
train or ship) and cut into rows of ``config.data.max_length`` tokens
(``config.data.max_rows`` keeps the first rows). Each row carries
``input_ids`` (int32), ``attention_mask`` and ``loss_mask`` (all ones), the
inputs of :class:`jft.models.llama.Llama` and the ``causal_lm_xent`` loss.
The text depends on the Python version, so results are stated with it.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jft.data.errors import DataError
from jft.data.token_rows import Source, TokenRows

__all__ = ["CORPORA", "NAME", "VOCAB_SIZE", "CorpusSplit", "documents", "open_split"]

NAME = "corpus"
VOCAB_SIZE = 256
SPLITS = ("train", "test")
_HELD_OUT_EVERY = 10


def _stdlib() -> dict[str, str]:
    lib = sysconfig.get_paths()["stdlib"]
    out = {}
    for name in sorted(os.listdir(lib)):
        if name.endswith(".py"):
            with open(os.path.join(lib, name), encoding="utf-8", errors="replace") as f:
                out[name] = f.read()
    return out


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


CORPORA: dict[str, Callable[[], dict[str, str]]] = {
    "stdlib": _stdlib,
    "pydoc_topics": _pydoc_topics,
}
"""Corpus name -> its documents (name -> text), in name order."""


def documents(corpus: str, split: str) -> dict[str, str]:
    """The documents of ``split`` (``"train"`` or ``"test"``) of ``corpus``.

    Raises:
      DataError: an unknown corpus or split.
    """
    if corpus not in CORPORA:
        raise DataError(
            f"config.data.corpus={corpus!r} is not a corpus; known: {', '.join(CORPORA)}"
        )
    if split not in SPLITS:
        raise DataError(
            f"split {split!r} of corpus {corpus!r} does not exist; use one of {', '.join(SPLITS)}"
        )
    docs = CORPORA[corpus]()
    held_out = split == "test"
    return {
        name: text
        for i, (name, text) in enumerate(docs.items())
        if ((i + 1) % _HELD_OUT_EVERY == 0) == held_out
    }


CorpusSplit = TokenRows
"""A corpus split cut into rows (an alias of :class:`jft.data.token_rows.TokenRows`)."""


_CACHE: dict[tuple, CorpusSplit] = {}


def open_split(cfg: Mapping[str, Any], split: str) -> CorpusSplit:
    """The split ``split`` of the corpus ``cfg["corpus"]``, in rows of ``cfg["max_length"]``.

    Raises:
      DataError: one line: an unknown corpus or split, a bad length, or a split
        shorter than one row.
    """
    corpus, length = cfg.get("corpus"), cfg.get("max_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise DataError(
            f"config.data.max_length={length!r}: corpus rows need an int of at least 2 "
            "(tokens per row), e.g. 128"
        )
    max_rows = cfg.get("max_rows")
    key = (corpus, split, length, max_rows)
    if key not in _CACHE:
        docs = documents(corpus, split)
        data = np.frombuffer("\n\n".join(docs.values()).encode("utf-8"), np.uint8)
        rows = len(data) // length
        if max_rows:
            rows = min(rows, int(max_rows))
        if rows == 0:
            raise DataError(
                f"split {split!r} of corpus {corpus!r} has {len(data)} tokens, fewer than "
                f"one row of config.data.max_length={length}; lower max_length"
            )
        ids = data[: rows * length].reshape(rows, length).astype(np.int32)
        ones = np.ones_like(ids)
        columns = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
        _CACHE[key] = CorpusSplit(Source(f"corpus:{corpus}"), columns, len(docs))
    return _CACHE[key]
