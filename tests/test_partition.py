"""jft.partition: rules -> labels, split/merge, the partitioned optimizer, LR decay, stages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jft
from jft import layerwise, partition
from jft.partition import PartitionError
from tests.helpers import nbytes


def make_params():
    return {
        "backbone": {
            "conv1": {"kernel": jnp.ones((3, 3, 3, 8))},
            "bn1": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            "layer1": {"conv": {"kernel": jnp.full((3, 3, 8, 8), 0.5)}},
        },
        "head": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
    }


HEAD_ONLY = [("head/.*", optax.adam(1e-3)), ("backbone/.*", None)]


# ----------------------------------------------------------------------------- labels


def test_labels_first_match_wins():
    rules = [("backbone/bn1/.*", optax.sgd(0.1)), ("backbone/.*", None), (".*", optax.adam(1e-3))]
    got = partition.labels(make_params(), rules)
    assert got == {
        "backbone": {
            "conv1": {"kernel": "frozen"},
            "bn1": {"scale": "0", "bias": "0"},
            "layer1": {"conv": {"kernel": "frozen"}},
        },
        "head": {"kernel": "2", "bias": "2"},
    }


def test_fullmatch_not_search():
    # "head" alone does not match "head/kernel": rules are anchored at both ends.
    with pytest.raises(PartitionError, match="match no rule"):
        partition.labels(make_params(), [("head", None), ("backbone/.*", None)])


def test_a_last_catch_all_may_claim_nothing():
    # A default for the rest (what a config adds after its rules) is no typo.
    rules = [("backbone/.*", None), ("head/.*", optax.sgd(1.0)), (".*", optax.sgd(0.1))]
    trainable, frozen = partition.split(make_params(), rules)
    assert list(trainable) == ["head"] and list(frozen) == ["backbone"]
    with pytest.raises(PartitionError, match=r"match no parameter.*'\.\*'"):
        partition.split(make_params(), [*rules[:2], (".*", None), ("head/x", None)])


@pytest.mark.parametrize(
    "rules, message",
    [
        ([("head/.*", None)], r"4 parameter\(s\) match no rule: backbone/conv1/kernel"),
        ([(".*", None), ("head/.*", optax.sgd(1.0))], r"match no parameter.*'head/\.\*'"),
        ([("backbone/.*", None), ("head/typo.*", None), (".*", None)], "'head/typo.*'"),
        ([("backbone/(.*", None), (".*", None)], r"invalid regex 'backbone/\(\.\*'"),
        ([("head/.*",)], "must be a .regex, optimizer or None. pair"),
        ([("head/.*", "adam"), (".*", None)], "optax.GradientTransformation or None"),
    ],
)
def test_bad_rules_give_one_line_errors(rules, message):
    for fn in (partition.labels, partition.split):
        with pytest.raises(PartitionError, match=message) as e:
            fn(make_params(), rules)
        assert "\n" not in str(e.value)
        assert isinstance(e.value, ValueError)


def test_unmatched_listing_is_truncated():
    params = {f"p{i}": jnp.zeros(1) for i in range(20)}
    with pytest.raises(PartitionError, match="20 parameter.*and 12 more") as e:
        partition.labels(params, [("q", None)])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- split / merge


def test_split_prunes_and_merge_restores():
    params = make_params()
    trainable, frozen = partition.split(params, HEAD_ONLY)
    assert set(trainable) == {"head"} and set(frozen) == {"backbone"}
    assert jax.tree.structure(partition.merge(trainable, frozen)) == jax.tree.structure(params)
    # A mixed subtree keeps only its own leaves on each side.
    rules = [("backbone/bn1/scale", optax.sgd(1.0)), (".*", None)]
    trainable, frozen = partition.split(params, rules)
    assert trainable == {"backbone": {"bn1": {"scale": params["backbone"]["bn1"]["scale"]}}}
    assert set(frozen["backbone"]["bn1"]) == {"bias"}
    merged = partition.merge(trainable, frozen)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, merged, params))
    # Everything trainable: the frozen side is empty.
    trainable, frozen = partition.split(params, [(".*", optax.sgd(1.0))])
    assert frozen == {} and jax.tree.structure(trainable) == jax.tree.structure(params)


def test_merge_rejects_overlap():
    with pytest.raises(PartitionError, match="'kernel' is in both"):
        partition.merge({"head": {"kernel": 1}}, {"head": {"kernel": 2}})


def test_split_accepts_frozendict():
    from flax.core import freeze

    trainable, frozen = partition.split(freeze(make_params()), HEAD_ONLY)
    assert set(trainable) == {"head"} and set(frozen) == {"backbone"}


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_state_covers_trainable_leaves_only():
    params = make_params()
    trainable, _ = partition.split(params, HEAD_ONLY)
    tx = partition.optimizer(HEAD_ONLY)
    state = tx.init(trainable)
    head_bytes = nbytes(params["head"])
    assert nbytes(state) == 2 * head_bytes + 4  # mu, nu and an int32 count
    # Given the full tree, frozen leaves still get no state, and zero updates.
    full_state = tx.init(params)
    assert nbytes(full_state) == nbytes(state)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, full_state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(not np.any(u) for u in jax.tree.leaves(updates["backbone"]))
    assert all(np.all(u != 0) for u in jax.tree.leaves(updates["head"]))


def test_optimizer_applies_each_rules_own_optimizer():
    params = make_params()
    rules = [
        ("backbone/bn1/.*", optax.sgd(0.1)),
        ("backbone/.*", None),
        ("head/.*", optax.adam(1e-2)),
    ]
    trainable, _ = partition.split(params, rules)
    tx = partition.optimizer(rules)
    state = tx.init(trainable)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), trainable)
    updates, state = jax.jit(tx.update)(grads, state, trainable)
    np.testing.assert_allclose(updates["backbone"]["bn1"]["scale"], -0.2)
    ref, _ = optax.adam(1e-2).update(grads["head"], optax.adam(1e-2).init(trainable["head"]))
    np.testing.assert_allclose(updates["head"]["kernel"], ref["kernel"], rtol=1e-6)
    new = optax.apply_updates(trainable, updates)
    assert jax.tree.structure(new) == jax.tree.structure(trainable)


def test_optimizer_composes_with_optax_chain():
    trainable, _ = partition.split(make_params(), HEAD_ONLY)
    tx = optax.chain(optax.clip_by_global_norm(1.0), partition.optimizer(HEAD_ONLY))
    state = tx.init(trainable)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 100.0), trainable)
    updates, _ = tx.update(grads, state, trainable)
    assert optax.global_norm(updates) > 0


def test_jft_optim_adam_state_bytes():
    rules = [("head/.*", jft.optim.adam(1e-3)), (".*", None)]
    trainable, _ = partition.split(make_params(), rules)
    state = partition.optimizer(rules).init(trainable)
    # mu and nu of the trained leaves, Adam's count, and the learning-rate step's
    # count and rate (what jft.train reports as metrics["lr"]).
    assert nbytes(state) == 2 * nbytes(trainable) + 4 + 8


def test_orbax_round_trip(tmp_path):
    params = make_params()
    rules = [("backbone/bn1/scale", optax.adam(1e-3)), ("backbone/.*", None), (".*", optax.sgd(1))]
    trainable, frozen = partition.split(params, rules)
    opt_state = partition.optimizer(rules).init(trainable)
    tree = {"trainable": trainable, "frozen": frozen, "opt_state": opt_state}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", tree)
        ckptr.wait_until_finished()
        restored = ckptr.restore(
            tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        )
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- layer-wise LR


def bert_like(num_layers=3):
    layer = {"attention": {"query": {"kernel": jnp.ones((4, 4))}}, "ln": {"scale": jnp.ones(4)}}
    return {
        "backbone": {
            "embeddings": {"word_embeddings": {"embedding": jnp.ones((10, 4))}},
            "encoder": {f"layer_{i}": layer for i in range(num_layers)},
        },
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


def test_layerwise_lr_decay():
    params = bert_like(3)
    rules = layerwise.layerwise_lr_rules(3, 1.0, 0.5, make_optimizer=optax.sgd)
    trainable, frozen = partition.split(params, rules)
    assert frozen == {}
    tx = partition.optimizer(rules)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    lr = lambda tree: -float(jax.tree.leaves(tree)[0].ravel()[0])
    assert lr(updates["head"]) == 1.0
    enc = updates["backbone"]["encoder"]
    assert [lr(enc[f"layer_{i}"]) for i in range(3)] == [0.125, 0.25, 0.5]
    assert lr(updates["backbone"]["embeddings"]) == 0.0625


def test_layerwise_lr_with_frozen_layers_and_default_adamw():
    params = bert_like(3)
    rules = layerwise.layerwise_lr_rules(
        3,
        1e-3,
        0.9,
        frozen=["backbone/embeddings/.*", "backbone/encoder/layer_0/.*"],
        embeddings=None,
    )
    labels = partition.labels(params, rules)
    assert labels["backbone"]["embeddings"]["word_embeddings"]["embedding"] == "frozen"
    assert jax.tree.leaves(labels["backbone"]["encoder"]["layer_0"]) == ["frozen"] * 2
    # layer_10 must not be claimed by layer_1's rule.
    rules = layerwise.layerwise_lr_rules(11, 1e-3, 0.9)
    labels = partition.labels(bert_like(11), rules)
    assert labels["backbone"]["encoder"]["layer_10"] != labels["backbone"]["encoder"]["layer_1"]
