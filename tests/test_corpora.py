"""The offline text corpora (jft.data.corpora): held-out documents, byte rows, one-line errors."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

import jft.train
from jft.data import corpora, pipeline
from jft.data.errors import DataError
from jft.train.checkpoint import read_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_text_transfer_recipe_tiny_pretrains_then_lora(tmp_path):
    """configs/text_transfer.py:tiny; LoRA starts from pretrain and trains adapters only.

    Two of the four stages: ``full`` and ``scratch`` are ``pretrain``'s program on
    the fine-tuning data (test time); every stage's config is checked to exist.
    """
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "configs/text_transfer.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config("tiny")
    assert config.stages == ("pretrain", "full", "lora", "scratch")
    assert config.full.init.path == config.lora.init.path == "stage:pretrain"
    assert not config.scratch.init.path and config.scratch.data == config.full.data
    config.stages = ("pretrain", "lora")
    for stage in config.stages:
        config[stage].progress = False
    results = jft.train.train_and_evaluate(config, str(tmp_path))
    assert list(results) == ["pretrain", "lora"]
    for stage, r in results.items():
        assert r["step"] == 2 and math.isfinite(r["eval/loss"]), stage
        assert r["eval/count"] == 16, stage
    pretrain, lora = read_params(tmp_path / "pretrain"), read_params(tmp_path / "lora")
    assert pretrain.keys() < lora.keys()
    assert all(np.array_equal(pretrain[k], lora[k]) for k in pretrain)  # the frozen base
    assert any(k.endswith("lora_B") and np.any(v) for k, v in lora.items())  # adapters trained
