"""The keys of `config.data`, their defaults, and their validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jft.data.errors import DataError

__all__ = ["default_config", "resolve"]


def default_config() -> ml_collections.ConfigDict:
    """Returns `config.data` with every key `jft.data` reads, set to its default.

    Keys:
      name: ``"digits"`` (the offline scikit-learn digits), ``"image_folder"`` (``path``
        holds one subfolder of images per class), ``"sft"`` (``path`` is a JSONL file of
        prompts and completions or chats) or a tensorflow-datasets catalog name
        (``"mnist"``, ``"cifar10"``, ``"imdb_reviews"``, ``"glue/sst2"``, ...).
      data_dir: the tfds data dir; ``None`` means ``$JFT_DATA_DIR``, else tfds' default.
      path: the root folder of ``image_folder``; the JSONL file of ``sft``.
      train_split, eval_split: split names; tfds slicing such as ``"train[:80%]"`` works.
      batch_size, eval_batch_size: GLOBAL batch sizes (all processes together).
      keep_classes: ``None`` or a sequence of labels to keep; they are relabelled
        ``0..len-1`` in the order given, e.g. ``(5, 6, 7, 8, 9)`` -> ``0..4``.
      preprocess: ops, e.g. ``"resize(32)|gray_to_rgb|normalize(0.5, 0.5)|flip_lr"``
        (see `jft.data.preprocess`); a plain mapping may also give a sequence of op
        strings, a ConfigDict takes the ``|``-joined string.
      download: only when ``True`` may tfds download and prepare a catalog data set.
      num_workers: threads that prepare batches ahead (0: in the calling thread).
      prefetch: how many batches each worker thread keeps ready.
      cache: ``"auto"`` keeps a split's records in memory when they take less than
        ``cache_max_mb``; ``True`` always, ``False`` never.
      cache_max_mb: the limit for ``cache="auto"``.
      tokenizer, chat_template, max_length, packing: ``name="sft"`` (a JSONL file at
        ``path``, see `jft.data.sft`): the model folder whose tokenizer (and chat
        template) encode it, a template string or ``.jinja`` file replacing the folder's,
        the tokens per row, and whether several examples share a row.
      corpus, max_rows: ``name="corpus"``: a text corpus that Python ships as byte rows
        of ``max_length`` tokens (``"stdlib"``, ``"pydoc_topics"``; `jft.data.corpora`),
        and ``None`` or the number of rows to keep.
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "digits"
    cfg.data_dir = ml_collections.config_dict.placeholder(str)
    cfg.path = ml_collections.config_dict.placeholder(str)
    cfg.train_split = "train"
    cfg.eval_split = "test"
    cfg.batch_size = 64
    cfg.eval_batch_size = 256
    cfg.keep_classes = ml_collections.config_dict.placeholder(tuple)
    cfg.preprocess = ""
    cfg.download = False
    cfg.num_workers = 0
    cfg.prefetch = 2
    cfg.cache = "auto"
    cfg.cache_max_mb = 1024
    cfg.tokenizer = ml_collections.config_dict.placeholder(str)
    cfg.chat_template = ml_collections.config_dict.placeholder(str)
    cfg.max_length = 512
    cfg.packing = False
    cfg.corpus = ml_collections.config_dict.placeholder(str)
    cfg.max_rows = ml_collections.config_dict.placeholder(int)
    return cfg


def resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> dict[str, Any]:
    """Returns a plain dict of all data keys: `cfg`'s values over the defaults.

    Raises:
      DataError: on a key that `jft.data` does not know.
    """
    out = default_config().to_dict()
    if cfg is None:
        return out
    items = cfg.items() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg).items()
    for key, value in items:
        if key not in out:
            raise DataError(f"unknown key config.data.{key}; known keys: {', '.join(sorted(out))}")
        out[key] = value
    if out["keep_classes"] is not None:
        out["keep_classes"] = tuple(int(c) for c in out["keep_classes"])
    for key in ("batch_size", "eval_batch_size"):
        if int(out[key]) <= 0:
            raise DataError(f"config.data.{key} must be positive, got {out[key]}")
    return out
