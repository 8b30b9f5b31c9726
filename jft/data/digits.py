"""`digits`: the 8x8 handwritten digits that scikit-learn ships, as a tfds builder.

1,797 real 8x8 grey images of the digits 0-9 (values 0..16), with a fixed, stratified
split: 20% of each class (chosen with a seeded permutation) in ``test``, the rest in
``train``. Nothing is downloaded: the data come from ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["PIXEL_MAX", "Digits", "split_indices"]

#: The largest pixel value of digits (scikit-learn stores 0..16); dividing by it gives [0, 1].
PIXEL_MAX = 16.0
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def split_indices() -> dict[str, np.ndarray]:
    """Returns the sorted indices into ``load_digits()`` of each split (stratified, seeded)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.default_rng(_SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(target == c)
        test.extend(rng.permutation(idx)[: round(_TEST_FRACTION * len(idx))])
    test = np.sort(np.asarray(test))
    train = np.setdiff1d(np.arange(len(target)), test)
    return {"train": train, "test": test}


class Digits(tfds.core.GeneratorBasedBuilder):
    """The scikit-learn digits: ``image`` uint8 (8, 8, 1) in 0..16, ``label`` 0..9."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "scikit-learn's load_digits, stratified 80/20 split (seed 0).",
        "1.1.0": "Raw uint8 pixels instead of PNG: records decode ~3x faster.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="8x8 handwritten digits from scikit-learn (UCI optdigits test set).",
            features=tfds.features.FeaturesDict(
                {
                    # Raw pixels: decoding a 64-byte PNG would cost more than the step.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        data = load_digits()
        for i in indices:
            image = data.images[i].astype(np.uint8)[..., None]
            yield int(i), {"image": image, "label": int(data.target[i])}
