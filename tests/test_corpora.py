"""The offline text corpora (jft.data.corpora): held-out documents, byte rows, one-line errors."""

import numpy as np
import pytest

from jft.data import corpora, pipeline
from jft.data.errors import DataError


def test_splits_hold_disjoint_documents_as_bytes():
    train = corpora.documents("pydoc_topics", "train")
    test = corpora.documents("pydoc_topics", "test")
    everything = corpora.CORPORA["pydoc_topics"]()
    assert not set(train) & set(test) and set(train) | set(test) == set(everything)
    assert len(test) == len(everything) // 10  # every tenth topic is held out
    cfg = {"corpus": "pydoc_topics", "max_length": 64, "max_rows": None}
    split = corpora.open_split(cfg, "test")
    ids = split.columns["input_ids"]
    assert ids.dtype == np.int32 and ids.shape[1] == 64 and split.num_documents == len(test)
    text = "\n\n".join(test.values()).encode()
    assert bytes(ids.reshape(-1).astype(np.uint8)) == text[: ids.size]
    assert split.columns["loss_mask"].all() and split.columns["attention_mask"].all()
    rows = corpora.open_split(dict(cfg, max_rows=3), "train").columns["input_ids"]
    assert rows.shape == (3, 64)
    info = pipeline.info({"name": "corpus", **cfg, "train_split": "train", "eval_split": "test"})
    assert info.num_classes == 0 and info.num_examples["test"] == len(ids)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"corpus": "poems", "max_length": 8}, r"config.data.corpus='poems' is not a corpus"),
        ({"corpus": "stdlib", "max_length": 1}, r"config.data.max_length=1: corpus rows need"),
        ({"corpus": "stdlib", "max_length": 8, "split": "validation"}, r"split 'validation'"),
    ],
)
def test_bad_corpus_config_is_one_line(cfg, message):
    with pytest.raises(DataError, match=message) as info:
        corpora.open_split(cfg, cfg.pop("split", "train"))
    assert "\n" not in str(info.value)
