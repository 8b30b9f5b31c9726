"""`get`: a checkpointable stream of this process's slice of every global batch.

The stream is a pure function of (seed, batch number): global batch ``b`` holds stream
positions ``b*B .. (b+1)*B-1`` (``B`` the global batch size); in training, position
``t`` is example ``perm_e[t mod n]`` of epoch ``e = t div n``, with ``perm_e`` a
permutation seeded by (seed, e). Process ``p`` of ``P`` reads rows
``p*B/P .. (p+1)*B/P-1`` of each global batch and nothing else. Batches are made by a
``grain.MapDataset`` over batch numbers, so grain's threads prefetch them and its
iterator state (the next batch number) restores the stream exactly.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from jft.data import config as config_lib
from jft.data import corpora, sft, sources
from jft.data import preprocess as preprocess_lib
from jft.data.errors import DataError

__all__ = ["DataInfo", "Pipeline", "get", "info", "preview"]

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the trainer needs to know about a data set before reading it.

    Attributes:
      name: the data set's name.
      num_classes: the number of classes after ``keep_classes`` (None without labels).
      num_examples: split -> number of examples after ``keep_classes``; the data set's
        splits and the configured ``train_split`` / ``eval_split`` strings.
      features: key -> (shape, dtype) of ONE example after preprocessing, without the
        batch axis, e.g. ``{"image": ((8, 8, 1), float32), "label": ((), int32)}``.
      class_names: the names of the kept classes in label order, when known.
    """

    name: str
    num_classes: int | None
    num_examples: dict[str, int]
    features: dict[str, tuple[tuple[int, ...], np.dtype]]
    class_names: tuple[str, ...] | None = None


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    return int(process_index), int(process_count)


class _Split:
    """One split after ``keep_classes``: example indices and a label map."""

    def __init__(self, cfg: dict[str, Any], split: str, dataset: sources.Dataset | None = None):
        self.dataset = dataset or sources.open_dataset(cfg)
        self.records = self.dataset.records(split, cfg["cache"], cfg["cache_max_mb"])
        keep = cfg["keep_classes"]
        self.label_map = None
        if keep is None:
            self.indices = np.arange(len(self.records))
        else:
            num = self.dataset.num_classes
            bad = [c for c in keep if c < 0 or (num is not None and c >= num)]
            if bad or len(set(keep)) != len(keep):
                raise DataError(
                    f"config.data.keep_classes={keep}: classes must be distinct and in "
                    f"[0, {num}) for data set {self.dataset.name!r}"
                )
            labels = self.dataset.labels(split, self.records)
            self.indices = np.flatnonzero(np.isin(labels, keep))
            self.label_map = np.full(max(int(labels.max()), max(keep)) + 1, -1, np.int64)
            self.label_map[list(keep)] = np.arange(len(keep))
        if len(self.indices) == 0:
            raise DataError(
                f"data set {self.dataset.name!r} split {split!r} has no examples"
                + (f" of classes {keep}" if keep is not None else "")
            )

    def columns(self, rows: np.ndarray) -> dict[str, Any]:
        columns = self.records.columns(self.indices[rows])
        if self.label_map is not None:
            columns["label"] = self.label_map[np.asarray(columns["label"])]
        return columns

    def batch(self, ops, rows: np.ndarray, ctx) -> dict[str, np.ndarray]:
        """The model's inputs and labels of ``rows``, after the preprocess ``ops``."""
        return preprocess_lib.apply(ops, self.columns(rows), ctx)


# Data sets of token rows for a causal LM (no classes): name -> open_split(cfg, split).
_TOKEN_ROWS = {sft.NAME: sft.open_split, corpora.NAME: corpora.open_split}


def _open(cfg: dict[str, Any], split: str) -> _Split | sft.SftSplit | corpora.CorpusSplit:
    """A split of ``config.data``: ``indices``, ``dataset`` and ``batch(ops, rows, ctx)``."""
    opener = _TOKEN_ROWS.get(cfg["name"])
    return opener(cfg, split) if opener else _Split(cfg, split)


class _BatchMaker:
    """Batch number -> this process's slice of that global batch, as numpy arrays."""

    def __init__(self, split: _Split, ops, *, train, seed, global_batch, local_batch, offset):
        self.split, self.ops, self.train, self.seed = split, ops, train, seed
        self.n = len(split.indices)
        self.global_batch, self.local_batch, self.offset = global_batch, local_batch, offset
        self.pixel_max = split.dataset.pixel_max
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            # A batch spans at most two epochs; threads may prefetch one more.
            self._perms = {**dict(list(self._perms.items())[-2:]), epoch: perm}
        return perm

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        start = batch * self.global_batch + self.offset
        positions = np.arange(start, start + self.local_batch, dtype=np.int64)
        if self.train:
            epochs, within = np.divmod(positions, self.n)
            rows = np.empty_like(positions)
            for e in np.unique(epochs):
                sel = epochs == e
                rows[sel] = self._perm(int(e))[within[sel]]
            mask = None
        else:
            mask = positions < self.n
            rows = np.where(mask, positions, 0)
        ctx = preprocess_lib.Context(self.train, self.seed, positions, self.pixel_max)
        out = self.split.batch(self.ops, rows, ctx)
        if mask is not None:
            out["mask"] = mask
        return out


class Pipeline(Iterator[dict[str, np.ndarray]]):
    """Iterates over this process's slices of the global batches; checkpointable.

    Attributes:
      batch_size: rows per yielded batch (the global batch size / process count).
      global_batch_size: rows per global batch.
      num_batches: batches in the stream, or None when it repeats forever.
      num_examples: examples in the split (after ``keep_classes``).
    """

    def __init__(self, maker: _BatchMaker, num_batches: int | None, num_workers: int, prefetch):
        self._maker = maker
        self.batch_size = maker.local_batch
        self.global_batch_size = maker.global_batch
        self.num_batches = num_batches
        self.num_examples = maker.n
        length = sys.maxsize if num_batches is None else num_batches
        ds = grain.MapDataset.range(length).map(maker)
        options = grain.ReadOptions(
            num_threads=int(num_workers), prefetch_buffer_size=int(num_workers) * int(prefetch)
        )
        self._iter = iter(ds.to_iter_dataset(options))

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this pipeline repeats forever: it has no length")
        return self.num_batches

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, a JSON-serialisable dict.

        ``{"version": 1, "next_batch": k, "seed": s, "global_batch_size": B,
        "train": bool}``: `set_state` on a pipeline made with the same config, split and
        seed (on any number of processes) continues with global batch ``k``.
        """
        return {
            "version": _STATE_VERSION,
            "next_batch": int(self._iter.get_state()["next_index"]),
            "seed": int(self._maker.seed),
            "global_batch_size": int(self.global_batch_size),
            "train": bool(self._maker.train),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues the stream from a `get_state` dict.

        Raises:
          DataError: when the state comes from a different seed, global batch size or mode.
        """
        for key, mine in (
            ("seed", self._maker.seed),
            ("global_batch_size", self.global_batch_size),
            ("train", self._maker.train),
        ):
            if key in state and state[key] != mine:
                raise DataError(
                    f"data state has {key}={state[key]!r} but this pipeline has {mine!r}"
                )
        nxt = int(state["next_batch"])
        if self.num_batches is not None and not 0 <= nxt <= self.num_batches:
            raise DataError(f"data state next_batch={nxt} is outside [0, {self.num_batches}]")
        self._iter.set_state({"next_index": nxt})

    def close(self) -> None:
        """Stops the prefetch threads."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def get(
    cfg: Any,
    split: str,
    *,
    train: bool,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> Pipeline:
    """Returns the stream of this process's slices of the global batches of ``split``.

    Args:
      cfg: ``config.data`` (a ConfigDict or a mapping; missing keys take
        `default_config`'s values).
      split: a split name, e.g. ``cfg.train_split``; tfds slicing works.
      train: True: shuffled with ``seed`` every epoch, repeated forever (or
        ``num_epochs`` times), global batches of ``cfg.batch_size`` with the remainder
        dropped, random ops on. False: one pass in order, global batches of
        ``cfg.eval_batch_size``, the last one padded to full size; every batch carries
        ``mask`` (bool, False on padding rows).
      seed: the shuffle and augmentation seed.
      process_index, process_count: this process and the number of processes
        (default: ``jax.process_index()``, ``jax.process_count()``).
      num_epochs: training only: stop after this many epochs (None: never).

    Returns:
      A `Pipeline` of dicts of numpy arrays with ``batch_size // process_count`` rows:
      ``image`` float32 NHWC and/or ``input_ids``, ``attention_mask``,
      ``token_type_ids`` int32, and ``label`` int32 (plus ``mask`` in evaluation);
      SFT data (``name="sft"``): ``input_ids``, ``attention_mask``, ``loss_mask``.

    Raises:
      DataError: on a bad key, data set, split, folder or op.
    """
    cfg = config_lib.resolve(cfg)
    p, count = _process(process_index, process_count)
    global_batch = int(cfg["batch_size"] if train else cfg["eval_batch_size"])
    if global_batch % count:
        key = "batch_size" if train else "eval_batch_size"
        raise DataError(
            f"config.data.{key}={global_batch} is not divisible by the {count} processes"
        )
    ops = preprocess_lib.parse(cfg["preprocess"])
    data = _open(cfg, split)
    n = len(data.indices)
    if train:
        if num_epochs is None:
            num_batches = None
        else:
            num_batches = num_epochs * n // global_batch
            if num_batches == 0:
                raise DataError(
                    f"{num_epochs} epoch(s) of {n} examples give no full batch of {global_batch}"
                )
    else:
        num_batches = -(-n // global_batch)
    local = global_batch // count
    maker = _BatchMaker(
        data,
        ops,
        train=train,
        seed=seed,
        global_batch=global_batch,
        local_batch=local,
        offset=p * local,
    )
    return Pipeline(maker, num_batches, cfg["num_workers"], cfg["prefetch"])


def info(cfg: Any) -> DataInfo:
    """Returns `DataInfo` of ``config.data`` (preparing a local data set if needed)."""
    cfg = config_lib.resolve(cfg)
    if cfg["name"] in _TOKEN_ROWS:  # token rows for a causal LM: no classes
        splits = {s: _open(cfg, s) for s in (cfg["train_split"], cfg["eval_split"])}
        first = splits[cfg["train_split"]]
        rows = {s: len(x.indices) for s, x in splits.items()}
        return DataInfo(first.dataset.name, 0, rows, first.features)
    train = _Split(cfg, cfg["train_split"])
    dataset = train.dataset
    splits = dict.fromkeys(dataset.splits)
    for s in (cfg["train_split"], cfg["eval_split"]):
        splits[s] = None
    num_examples = {}
    for s in splits:
        try:
            num_examples[s] = len(_Split(cfg, s, dataset).indices)
        except DataError:
            if s in (cfg["train_split"], cfg["eval_split"]):
                raise
    ops = preprocess_lib.parse(cfg["preprocess"])
    ctx = preprocess_lib.Context(False, 0, np.zeros(1, np.int64), dataset.pixel_max)
    example = preprocess_lib.apply(ops, train.columns(np.zeros(1, np.int64)), ctx)
    features = {k: (tuple(v.shape[1:]), v.dtype) for k, v in example.items()}
    keep = cfg["keep_classes"]
    names = dataset.class_names
    if keep is not None:
        num_classes = len(keep)
        names = tuple(names[c] for c in keep) if names else None
    else:
        num_classes = dataset.num_classes
    if num_classes == 1:
        what = (
            f"config.data.keep_classes={keep} keeps one class"
            if keep is not None
            else f"data set {dataset.name!r}"
            + (f" ({cfg['path']})" if cfg.get("path") else "")
            + f" has one class{f' ({names[0]})' if names else ''}"
        )
        raise DataError(
            f"{what}: a classifier of one class learns nothing (accuracy 1.0 from the start); "
            "give it two classes or more"
        )
    return DataInfo(dataset.name, num_classes, num_examples, features, names)


def preview(cfg: Any) -> DataInfo | None:
    """`info`'s ``features`` and ``num_classes`` from the builder's code, preparing nothing.

    For the checks that must come before a data set is prepared (LoRA targets
    against the model's parameters). One zero example of the declared features
    goes through ``config.data.preprocess``; ``num_examples`` is empty. None when
    the code does not fix the features: token rows, an image folder, a feature
    of unknown shape.

    Raises:
      DataError: a bad ``config.data.preprocess`` (a missing tokenizer).
    """
    import tensorflow_datasets as tfds

    cfg = config_lib.resolve(cfg)
    builder = None if cfg["name"] in _TOKEN_ROWS else sources.described_builder(cfg)
    if builder is None:
        return None
    columns: dict[str, Any] = {}
    for key, feature in builder.info.features.items():
        if isinstance(feature, tfds.features.Text):
            columns[key] = np.array([b""], object)
        elif isinstance(feature, tfds.features.Tensor | tfds.features.Image) and (
            None not in feature.shape
        ):
            columns[key] = np.zeros((1, *feature.shape), feature.np_dtype)
        else:
            return None
    ctx = preprocess_lib.Context(False, 0, np.zeros(1, np.int64))
    example = preprocess_lib.apply(preprocess_lib.parse(cfg["preprocess"]), columns, ctx)
    features = {k: (tuple(v.shape[1:]), v.dtype) for k, v in example.items()}
    label = builder.info.features["label"] if "label" in builder.info.features else None
    keep = cfg["keep_classes"]
    num_classes = len(keep) if keep is not None else getattr(label, "num_classes", None)
    return DataInfo(builder.name, num_classes, {}, features)
