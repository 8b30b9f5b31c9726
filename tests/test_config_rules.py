"""Partition rules from a config (frozen, rules, layerwise_lr), as jft.partition takes them."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import cli, layerwise, optim, partition
from jft.train import config as config_lib
from tests.helpers import JFT_BERT

ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}


def bert_like(num_layers=2):
    layer = {"attention": {"kernel": jnp.full((3, 3), 0.5)}, "ln": {"bias": jnp.full(3, 0.25)}}
    return {
        "backbone": {
            "embeddings": {"word": {"embedding": jnp.full((5, 3), 2.0)}},
            "encoder": {f"layer_{i}": layer for i in range(num_layers)},
        },
        "head": {"kernel": jnp.full((3, 2), 1.5), "bias": jnp.full(2, -1.0)},
    }


def resolved(**keys):
    c = config_lib.default_config()
    c.optimizer = dict(ADAMW)
    for key, value in keys.items():
        group, _, leaf = key.rpartition("__")
        (c[group] if group else c)[leaf] = value
    return config_lib.resolve(c)


def one_update(rules, params):
    tx = partition.optimizer(rules)
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    # One compile instead of an eager dispatch per operation and leaf.
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def test_rules_from_a_config_equal_the_same_rules_in_python():
    # Discriminative learning rates (the head at 10x), per-group weight decay and
    # layer-wise LR decay, with the embeddings frozen.
    config = resolved(
        frozen=("backbone/embeddings/.*",),
        rules=(("head/.*", {"lr": 1e-2}), (".*/ln/bias", {"weight_decay": 0.0})),
        layerwise_lr__decay=0.5,
        layerwise_lr__num_layers=2,
    )
    got = config_lib.build_rules(config)
    frozen = ["backbone/embeddings/.*"]
    want = [
        ("backbone/embeddings/.*", None),
        ("head/.*", optim.adamw(1e-2, weight_decay=0.01)),
        (".*/ln/bias", optim.adamw(1e-3, weight_decay=0.0)),
        *layerwise.layerwise_lr_rules(
            2, 1e-3, 0.5, lambda lr: optim.adamw(lr, weight_decay=0.01), frozen=frozen
        )[1:],
    ]
    assert (
        [r for r, _ in got]
        == [r for r, _ in want]
        == [
            "backbone/embeddings/.*",
            "head/.*",
            ".*/ln/bias",
            "backbone/encoder/layer_1/.*",
            "backbone/encoder/layer_0/.*",
            ".*",  # claims nothing here: a last default may find nothing left
        ]
    )
    trainable, _ = partition.split(bert_like(), got)
    a, b = one_update(got, trainable), one_update(want, trainable)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # Each group's rate and weight decay, against AdamW's first step by its formula:
    # m = (1 - b1) g and v = (1 - b2) g^2 bias-correct to g and g^2.
    grads = jax.tree.map(lambda p: np.linspace(-1.0, 1.0, p.size).reshape(p.shape), trainable)

    def adamw_step(path, lr, wd):
        g, p = (np.asarray(_at(t, path), np.float64) for t in (grads, trainable))
        np.testing.assert_allclose(_at(a, path), -lr * (g / (np.abs(g) + 1e-8) + wd * p), rtol=1e-5)

    adamw_step("head/kernel", 1e-2, 0.01)
    adamw_step("backbone/encoder/layer_1/attention/kernel", 1e-3 * 0.5, 0.01)
    adamw_step("backbone/encoder/layer_0/attention/kernel", 1e-3 * 0.25, 0.01)
    adamw_step("backbone/encoder/layer_0/ln/bias", 1e-3, 0.0)
    assert "embeddings" not in trainable["backbone"]


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.parametrize(
    "keys, line",
    [
        (
            {"rules": (("head/.*", {"lrr": 1.0}),)},
            "unknown config key 'rules[0][1].lrr' for adamw; rules[0][1] may set name, lr, "
            "b1, b2, eps, weight_decay, mask",
        ),
        (
            {"rules": (("head/.*", {"lr": -1.0}),)},
            "config key 'rules[0][1].lr' is -1.0; it must be a finite number >= 0 (e.g. 1e-3)",
        ),
        ({"rules": (("head/(", None),)}, "config key 'rules[0]' has an invalid regex 'head/('"),
        (
            {"rules": ("head/.*",)},
            "config key 'rules[0]' is 'head/.*'; it must be a (regex, settings) pair, "
            "settings a dict of optimizer keys or None to freeze",
        ),
        (
            {"layerwise_lr__decay": 0.8},
            "config key 'layerwise_lr.num_layers' is 0; it must be the model's number of "
            "transformer blocks (>= 1) when layerwise_lr.decay < 1",
        ),
        (
            {"layerwise_lr__decay": 1.5},
            "config key 'layerwise_lr.decay' is 1.5; it must be in (0, 1] (1: off)",
        ),
    ],
    ids=["unknown_arg", "negative_lr", "bad_regex", "not_a_pair", "no_layers", "decay"],
)
def test_config_rule_mistakes_are_one_line_errors(keys, line):
    with pytest.raises(config_lib.ConfigError) as e:
        resolved(**keys)
    assert str(e.value).startswith(line), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_the_keys_of_its_group():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.resolve({"layerwise_lr": {"decy": 0.5}})
    assert str(e.value) == (
        "unknown config key 'layerwise_lr.decy'; layerwise_lr has: "
        "decay, embeddings, layer_prefix, num_layers"
    )


def test_rules_are_checked_against_the_models_parameters():
    info = types.SimpleNamespace(
        name="text",
        features={"input_ids": ((8,), np.int32), "label": ((), np.int32)},
        num_examples={"train": 100},
        num_classes=2,
    )
    bert = {"name": "bert", "num_classes": 2, **JFT_BERT}
    config = resolved(model=bert, layerwise_lr__decay=0.9, layerwise_lr__num_layers=3)
    model = config_lib.build_model(config, 2)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^config key 'layerwise_lr.num_layers' is 3, but bert has 2 blocks",
    ):
        config_lib.check_run(config, info, model, "/nonexistent")
    config = resolved(model=bert, rules=(("head/typo", {"lr": 1e-2}),))
    with pytest.raises(
        config_lib.ConfigError, match=r"do not fit bert: rule\(s\) match no parameter.*'head/typo'"
    ):
        config_lib.check_run(config, info, model, "/nonexistent")


def test_command_sets_any_argument_of_a_rules_optimizer(capsys):
    rules = "--config.rules=(('head/.*', {'lr': 0.01}),)"
    assert cli.main(["config", "digits_mlp", rules, "--config.rules[0][1].b1=0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rules = (('head/.*', {'lr': 0.01, 'b1': 0.5}),)  # default: ()" in lines
    assert "optimizer.lr = 0.001" in lines and "optimizer.b2 = 0.999" in lines
    assert cli.main(["config", "digits_mlp", rules, "--config.rules[0][1].lrr=1"]) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "jft config: error: unknown config key 'rules[0][1].lrr'; rules[0][1] takes the keys "
            "of an optimizer: "
        )
    )
