"""Data: tfds builders and catalog data sets, read with grain into per-process batches.

>>> import jft
>>> cfg = {"name": "digits", "batch_size": 32, "keep_classes": (5, 6, 7, 8, 9)}
>>> batches = jft.data.get(cfg, "train", train=True, seed=0, process_index=0,
...                        process_count=1)  # doctest: +SKIP
>>> next(batches)["image"].shape  # doctest: +SKIP
(32, 8, 8, 1)
"""

from jft.data.config import default_config
from jft.data.digits import Digits
from jft.data.errors import DataError
from jft.data.image_folder import ImageFolder
from jft.data.pipeline import DataInfo, Pipeline, get, info, preview
from jft.data.preprocess import parse as parse_preprocess
from jft.data.tweet_sentiment import TweetSentiment

__all__ = [
    "DataError",
    "DataInfo",
    "Digits",
    "ImageFolder",
    "Pipeline",
    "TweetSentiment",
    "default_config",
    "get",
    "info",
    "parse_preprocess",
    "preview",
]
