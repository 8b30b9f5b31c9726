"""Data sets by name: prepared tfds builders, read by random access (array_record).

`open_dataset` turns ``config.data`` into a `Dataset` whose splits give `Records`: random
access to decoded records, in memory for small splits. Nothing is downloaded unless
``config.data.download`` is true; a catalog data set that is not prepared fails at once.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import io
import os
import threading
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from jft.data import digits as digits_lib
from jft.data import image_folder as image_folder_lib
from jft.data import tweet_sentiment as tweet_sentiment_lib
from jft.data.errors import DataError

__all__ = [
    "DOWNLOAD_PROBE",
    "Dataset",
    "MemoryRecords",
    "SourceRecords",
    "data_dir",
    "described_builder",
    "open_dataset",
]

_CHUNK = 1024
_MEMORY: collections.OrderedDict[tuple, MemoryRecords] = collections.OrderedDict()
_MEMORY_SLOTS = 4
_LABELS: dict[tuple, np.ndarray] = {}
_LOCK = threading.Lock()


def data_dir(cfg: dict[str, Any]) -> str | None:
    """``config.data.data_dir``, else ``$JFT_DATA_DIR``, else None (tfds' default)."""
    return cfg.get("data_dir") or os.environ.get("JFT_DATA_DIR") or None


def _columns(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Row dicts -> one array per feature (same shapes) or a list (different shapes)."""
    out = {}
    for key in records[0]:
        values = [r[key] for r in records]
        first = values[0]
        if isinstance(first, np.ndarray) and first.ndim > 0:
            if all(v.shape == first.shape for v in values):
                out[key] = np.stack(values)
            else:
                out[key] = values
        elif isinstance(first, bytes | str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.asarray(values)
    return out


def _take(column: Any, idx: np.ndarray) -> Any:
    if isinstance(column, list):
        return [column[i] for i in idx]
    return column[idx]


class MemoryRecords:
    """A split held in memory as one array (or list) per feature."""

    def __init__(self, columns: dict[str, Any], decode):
        self._columns = columns
        self._decode = decode
        self._len = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self._len

    def columns(self, indices: np.ndarray) -> dict[str, Any]:
        """The decoded records at ``indices``, one array (or list) per feature."""
        return self._decode({k: _take(v, indices) for k, v in self._columns.items()})

    def labels(self) -> np.ndarray:
        """Every record's label."""
        return np.asarray(self._columns["label"])


class SourceRecords:
    """A split read record by record from its array_record files (`tfds.data_source`)."""

    def __init__(self, source, decode):
        self._source = source
        self._decode = decode

    def __len__(self) -> int:
        return len(self._source)

    def raw(self, indices: np.ndarray) -> dict[str, Any]:
        """The tfds-decoded records at ``indices``."""
        return _columns(self._source.__getitems__([int(i) for i in indices]))

    def columns(self, indices: np.ndarray) -> dict[str, Any]:
        """The decoded records at ``indices``, one array (or list) per feature."""
        return self._decode(self.raw(indices))

    def labels(self) -> np.ndarray:
        """Every record's label (reads every record once)."""
        return np.concatenate(
            [
                np.asarray(self.raw(np.arange(s, min(s + _CHUNK, len(self))))["label"])
                for s in range(0, len(self), _CHUNK)
            ]
        )


def _decode_bytes_images(columns: dict[str, Any]) -> dict[str, Any]:
    """Encoded image files (image_folder) -> uint8 RGB arrays."""
    images = [np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB")) for b in columns["image"]]
    first = images[0].shape
    columns = dict(columns)
    columns["image"] = np.stack(images) if all(x.shape == first for x in images) else images
    return columns


def _identity(columns: dict[str, Any]) -> dict[str, Any]:
    return columns


def _tf_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


@dataclasses.dataclass
class Dataset:
    """A prepared data set: its builder and how to read and decode its records."""

    name: str
    builder: Any
    pixel_max: float = 255.0
    encoded_images: bool = False

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> number of records."""
        return {k: v.num_examples for k, v in self.builder.info.splits.items()}

    @property
    def label_feature(self):
        """The tfds ``label`` feature (a ClassLabel), or None."""
        features = self.builder.info.features
        return features["label"] if "label" in features else None

    @property
    def num_classes(self) -> int | None:
        """The number of classes before ``keep_classes``, when the data set has labels."""
        feature = self.label_feature
        return getattr(feature, "num_classes", None) if feature is not None else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class names, when the data set names them."""
        feature = self.label_feature
        names = getattr(feature, "names", None) if feature is not None else None
        return tuple(names) if names else None

    def _check_split(self, split: str) -> None:
        base = split.split("[")[0].split("+")[0].strip()
        if base not in self.splits:
            raise DataError(
                f"data set {self.name!r} has no split {base!r} (splits: "
                f"{', '.join(sorted(self.splits))})"
            )

    def _decode(self):
        return _decode_bytes_images if self.encoded_images else _identity

    def records(self, split: str, cache: bool | str = "auto", cache_max_mb: float = 1024):
        """The records of ``split`` (tfds slicing such as ``train[:10%]`` works)."""
        self._check_split(split)
        key = (str(self.builder.data_path), split)
        with _LOCK:
            if key in _MEMORY and cache is not False:
                _MEMORY.move_to_end(key)
                return _MEMORY[key]
        if self.builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return self._tfrecord_records(split, key)
        source = SourceRecords(self.builder.as_data_source(split), self._decode())
        if len(source) == 0:
            raise DataError(f"data set {self.name!r} split {split!r} is empty")
        if cache == "auto":
            first = source.raw(np.arange(1))
            size = sum(
                sum(len(x) for x in v) if v.dtype == object else v.nbytes
                for v in first.values()
                if isinstance(v, np.ndarray)
            )
            cache = size * len(source) <= cache_max_mb * 2**20
        if not cache:
            return source
        chunks = [
            source.raw(np.arange(s, min(s + _CHUNK, len(source))))
            for s in range(0, len(source), _CHUNK)
        ]
        columns = {}
        for k in chunks[0]:
            parts = [c[k] for c in chunks]
            if (
                all(isinstance(p, np.ndarray) for p in parts)
                and len({p.shape[1:] for p in parts}) == 1
            ):
                columns[k] = np.concatenate(parts)
            else:
                columns[k] = [x for p in parts for x in p]
        return self._remember(key, MemoryRecords(columns, self._decode()))

    def _remember(self, key, records):
        with _LOCK:
            _MEMORY[key] = records
            while len(_MEMORY) > _MEMORY_SLOTS:
                _MEMORY.popitem(last=False)
        return records

    def _tfrecord_records(self, split: str, key) -> MemoryRecords:
        """A tfrecord-only data set, read once through tf.data into memory."""
        if not _tf_available():
            raise DataError(
                f"data set {self.name!r} is prepared as tfrecord in {self.builder.data_dir}: "
                "install TensorFlow (pip install 'jft[tf]') to read it, or prepare it as "
                f"array_record (tfds build {self.name} --file_format=array_record)"
            )
        ds = tfds.load(
            self.name,
            split=split,
            data_dir=self.builder.data_dir_root,
            download=False,
            shuffle_files=False,
        )
        rows = list(tfds.as_numpy(ds))
        if not rows:
            raise DataError(f"data set {self.name!r} split {split!r} is empty")
        return self._remember(key, MemoryRecords(_columns(rows), self._decode()))

    def labels(self, split: str, records) -> np.ndarray:
        """Every label of ``split`` (remembered per split)."""
        key = (str(self.builder.data_path), split)
        with _LOCK:
            if key in _LABELS:
                return _LABELS[key]
        if self.label_feature is None:
            raise DataError(f"data set {self.name!r} has no 'label' feature")
        labels = records.labels().astype(np.int64)
        with _LOCK:
            _LABELS[key] = labels
        return labels


def _prepare_local(builder) -> None:
    """Prepares a jft builder (digits, tweet_sentiment, image_folder): nothing is downloaded.

    Several processes may prepare the same data dir at once (one host, many
    processes): tfds writes into a temporary folder and renames it, so a process
    that loses the race finds the data prepared by another and carries on.
    """
    if builder.is_prepared():
        return
    # A second of work: no tfds banner or progress bars, one line of ours instead.
    print(f"jft: preparing {builder.name} in {builder.data_dir_root} (once)", flush=True)
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = tqdm_utils._active
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(file_format="array_record")
    except Exception:
        if not builder.is_prepared():
            raise
    finally:
        tfds.display_progress_bar(was_active)


def _catalog(cfg: dict[str, Any], ddir: str | None):
    name = cfg["name"]
    try:
        builder = tfds.builder(name, data_dir=ddir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown data set {name!r}: use 'digits', 'tweet_sentiment', 'image_folder' or a "
            "tfds catalog name"
        ) from e
    except Exception as e:  # a bad config name, an unreadable dir: one line, with the cause
        raise DataError(f"data set {name!r}: {str(e).splitlines()[0]}") from e
    if builder.is_prepared():
        return builder
    where = builder.data_dir_root
    if not cfg.get("download"):
        raise DataError(
            f"data set {name!r} is not prepared in {where}: set config.data.download=True on "
            f"a machine with internet, or run `tfds build {name} --data_dir {where} "
            "--file_format array_record` (add --manual_dir DIR for data sets downloaded by "
            "hand), or point config.data.data_dir (or $JFT_DATA_DIR) at a prepared copy"
        )
    if type(builder).__module__.startswith("tensorflow_datasets."):  # tfds' own catalog
        _check_online(name)
    builder = tfds.builder(name, data_dir=ddir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return builder


#: Where :func:`_check_online` knocks before a download (tfds' catalog data mostly
#: lives there); ``$JFT_DOWNLOAD_PROBE`` (``host:port``) changes it.
DOWNLOAD_PROBE = "storage.googleapis.com:443"
_PROBE_SECONDS = 3.0


def _check_online(name: str) -> None:
    """Raises DataError within seconds when the download host cannot be reached.

    Offline, tfds retries each file for minutes before it fails with a traceback.
    """
    import socket

    host, _, port = os.environ.get("JFT_DOWNLOAD_PROBE", DOWNLOAD_PROBE).rpartition(":")
    result: list[BaseException | None] = []

    def knock() -> None:  # in a thread: name resolution itself may hang
        try:
            socket.create_connection((host, int(port)), timeout=_PROBE_SECONDS).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=knock, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS + 0.5)
    if not result or result[0] is not None:
        why = "no answer" if not result else (result[0].strerror or type(result[0]).__name__)
        raise DataError(
            f"data set {name!r}: config.data.download=True but {host}:{port} cannot be "
            f"reached ({why}), so this machine seems offline: prepare it on a machine with "
            f"internet (tfds build {name} --file_format array_record) and point "
            "config.data.data_dir (or $JFT_DATA_DIR) at the copy"
        )


def described_builder(cfg: dict[str, Any]) -> Any | None:
    """The tfds builder that ``config.data`` names, neither prepared nor read; None if unknown.

    Its ``info.features`` are what the builder's code declares; an image folder's
    sizes are known only once it is prepared, so it gives None.
    """
    name, ddir = cfg["name"], data_dir(cfg)
    try:
        if name == "digits":
            return digits_lib.Digits(data_dir=ddir, file_format="array_record")
        if name == "tweet_sentiment":
            return tweet_sentiment_lib.TweetSentiment(data_dir=ddir, file_format="array_record")
        if name == "image_folder":
            return None
        return tfds.builder(name, data_dir=ddir)
    except Exception:  # open_dataset reports it, in one line
        return None


def open_dataset(cfg: dict[str, Any]) -> Dataset:
    """The prepared `Dataset` that ``config.data`` names (prepared here if local)."""
    name = cfg["name"]
    ddir = data_dir(cfg)
    if name == "digits":
        builder = digits_lib.Digits(data_dir=ddir, file_format="array_record")
        _prepare_local(builder)
        return Dataset(name, builder, pixel_max=digits_lib.PIXEL_MAX)
    if name == "image_folder":
        builder = image_folder_lib.builder(cfg.get("path"), ddir)
        _prepare_local(builder)
        return Dataset(name, builder, encoded_images=True)
    if name == "tweet_sentiment":
        tweet_sentiment_lib.csv_path()  # the package that ships the corpus, or one line
        builder = tweet_sentiment_lib.TweetSentiment(data_dir=ddir, file_format="array_record")
        _prepare_local(builder)
        return Dataset(name, builder)
    return Dataset(name, _catalog(cfg, ddir))
