"""The offline text corpora (jft.data.corpora): held-out documents, byte rows, one-line errors."""

import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import jft.partition
import jft.train
from jft.data import corpora, pipeline
from jft.data.errors import DataError
from jft.train import config as config_lib

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


def _recipe(arg=None):
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "configs/text_transfer.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe.get_config(arg)


def test_text_transfer_recipe_stages_and_a_lora_step():
    """configs/text_transfer.py:tiny: each stage's model, rules and corpus rows fit; the
    LoRA stage trains adapters only. One real train step of it (the stages' runs through
    train_and_evaluate take a minute of CPU: the digits recipes test the stage chain)."""
    config = _recipe("tiny")
    assert config.stages == ("pretrain", "full", "lora", "scratch")
    assert config.full.init.path == config.lora.init.path == "stage:pretrain"
    assert not config.scratch.init.path and config.scratch.data == config.full.data
    assert (config.pretrain.data.corpus, config.full.data.corpus) == ("stdlib", "pydoc_topics")
    config_lib.validate_stages(config)
    for stage in config.stages:
        run = config_lib.resolve(config[stage])
        model = config_lib.build_model(run, 0)
        rules = config_lib.build_rules(run)
        rows = corpora.open_split(run.data, "train").columns
        batch = {k: v[: run.data.batch_size] for k, v in rows.items()}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        variables = jax.eval_shape(lambda m=model, x=inputs: m.init(jax.random.key(0), **x))
        logits = jax.eval_shape(lambda v, m=model, x=inputs: m.apply(v, **x), variables)
        assert logits.shape == (*batch["input_ids"].shape, corpora.VOCAB_SIZE), stage
        trainable, frozen = jft.partition.split(variables["params"], rules)
        names = flatten_dict(trainable, sep="/")
        if stage != "lora":
            assert not jax.tree.leaves(frozen), stage
            continue
        assert names and all(k.endswith(("lora_A", "lora_B")) for k in names)
        assert "lm_head" in frozen and "embed_tokens" in frozen["backbone"]
        lora = model, rules, inputs, batch
    # One train step of the LoRA stage moves its adapters only.
    model, rules, inputs, batch = lora
    state = jft.train.create_train_state(jax.jit(model.init)(jax.random.key(0), **inputs), rules)
    loss = jft.train.losses.get("causal_lm_xent")
    step = jft.train.make_train_step(
        model, rules, loss, inputs=lambda b: {k: b[k] for k in inputs}, parallel="none"
    )
    before = {k: np.array(v) for k, v in flatten_dict(state.variables, sep="/").items()}
    state, metrics = step(state, batch)
    after = flatten_dict(state.variables, sep="/")
    assert math.isfinite(float(metrics["loss"]))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.endswith("lora_A") or k.endswith("lora_B") for k in moved), moved
