"""jft.train engine: parallel modes agree, gradient accumulation, non-finite guard, bf16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import jft.models
import jft.weights.sharding
from jft import train
from jft.train import losses, parallel

pytestmark = pytest.mark.devices(8)  # a mesh and pmap over 8 devices

MODES = ("none", "jit", "pmap")


def cnn():
    # dropout_rate=0: under pmap each device draws its masks from the same key, so
    # dropout differs from one device's; everything else must agree.
    return jft.models.get("cnn", widths=(8, 16), num_classes=10, dropout_rate=0.0)


def mlp(**kwargs):
    return jft.models.get("mlp", widths=(64, 64), num_classes=10, **kwargs)


def batches(n, rows=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.normal(size=(rows, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, rows).astype(np.int32),
        }
        for _ in range(n)
    ]


_INIT = {}


def init(model):
    # Initialised once per architecture (compiling init costs seconds on a loaded CPU).
    key = repr(model)
    if key not in _INIT:
        x = np.zeros((2, 8, 8, 1), np.float32)
        _INIT[key] = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), x))
    return jax.tree.map(np.copy, _INIT[key])


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def max_diff(a, b):
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# The layout tests compare runs that add the same numbers in different orders.
# They train with SGD, whose update is linear in the gradient, so rounding stays
# rounding (< 1e-6 here). Adam's first steps are ±lr·sign(g): rounding noise in
# a gradient that is zero in exact arithmetic becomes an lr-sized difference,
# and whether it does depends on the machine's reduction order.
LAYOUT_RULES = [(".*", optax.sgd(0.1))]


def train_run(model, mode, data, *, rules=None, fsdp=False, **kwargs):
    rules = rules or LAYOUT_RULES
    par = parallel.Parallel(mode, fsdp=fsdp)
    state = par.place_state(train.create_train_state(init(model), rules))
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), parallel=par, **kwargs)
    for batch in data:
        state, metrics = step(state, par.shard_batch(batch))
    return par.host_state(state), metrics


def test_modes_agree_after_20_steps_with_batchnorm():
    # The same global batch for 20 steps: with 20 different random batches a
    # rounding-level difference can flip a max-pool argmax near a tie, a chaotic
    # divergence, not a disagreement of the modes.
    data = batches(1) * 20
    got = {mode: train_run(cnn(), mode, data) for mode in MODES}
    want, _ = got["none"]
    for mode in ("jit", "pmap"):
        state, metrics = got[mode]
        diff = max_diff(
            {"p": want.params, "bs": want.batch_stats}, {"p": state.params, "bs": state.batch_stats}
        )
        print(f"{mode} vs one device after 20 steps: {diff:.2e}")
        assert diff <= 1e-5, mode
        assert int(state.step) == 20
        assert np.isclose(float(metrics["loss"]), float(got["none"][1]["loss"]), atol=1e-5)


def test_fsdp_shards_params_and_optimizer_state_and_agrees(monkeypatch):
    # The small cnn's leaves are tiny; the FSDP rule is jft.weights.sharding's.
    monkeypatch.setattr(jft.weights.sharding, "FSDP_MIN_SIZE", 256)
    data = batches(5)
    # Adam, for its two sharded moments; eps=1e-3 bounds its sensitivity to the
    # rounding of the gradient (|d update / d g| <= lr/eps = 10, so ~1e-9 of
    # rounding moves a parameter by ~1e-8), see LAYOUT_RULES.
    rules = [(".*", optax.adam(1e-2, eps=1e-3))]
    want, _ = train_run(cnn(), "none", data, rules=rules)
    par = parallel.Parallel("jit", fsdp=True)
    state = par.place_state(train.create_train_state(init(cnn()), rules))
    kernel = state.trainable["backbone"]["conv2"]["kernel"]  # (3, 3, 8, 16)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "data")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 2)
    step = train.make_train_step(cnn(), rules, losses.get("softmax_xent"), parallel=par)
    for batch in data:
        state, _ = step(state, par.shard_batch(batch))
    kernel = state.trainable["backbone"]["conv2"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "data")
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    assert len(moments) == 2  # Adam's mu and nu
    assert all(x.sharding.spec == kernel.sharding.spec for x in moments)
    assert max_diff(want.params, state.params) <= 1e-5


def test_four_microbatches_of_8_equal_one_batch_of_32():
    data = batches(3)
    whole, m1 = train_run(mlp(), "none", data)
    accum, m4 = train_run(mlp(), "none", data, grad_accum_steps=4)
    assert max_diff(whole.params, accum.params) <= 1e-5
    assert np.isclose(float(m1["loss"]), float(m4["loss"]), atol=1e-6)
    assert np.isclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)


def test_accumulation_threads_batchnorm_stats_and_agrees_across_modes():
    data = batches(1)
    got = {mode: train_run(cnn(), mode, data, grad_accum_steps=4)[0] for mode in MODES}
    for mode in ("jit", "pmap"):
        diff = max_diff(
            {"p": got["none"].params, "bs": got["none"].batch_stats},
            {"p": got[mode].params, "bs": got[mode].batch_stats},
        )
        assert diff <= 1e-5, mode
    # The running statistics saw the 4 microbatches (rows m, m+4, ...) in turn.
    model, variables = cnn(), init(cnn())
    stats = variables["batch_stats"]
    for m in range(4):
        _, new = model.apply(
            {"params": variables["params"], "batch_stats": stats},
            data[0]["image"][m::4],
            train=True,
            mutable=["batch_stats"],
        )
        stats = new["batch_stats"]
    assert max_diff(stats, got["none"].batch_stats) <= 1e-6


@pytest.mark.parametrize("mode", ["none", "jit", "pmap"])
def test_nonfinite_steps_are_skipped_and_counted(mode):
    model = cnn()
    rules = [(".*", optax.adam(1e-2))]
    par = parallel.Parallel(mode)
    state = par.place_state(train.create_train_state(init(model), rules))
    step = train.make_train_step(
        model, rules, losses.get("softmax_xent"), parallel=par, donate=False
    )
    (good,) = batches(1)
    bad = {**good, "image": good["image"].copy()}
    bad["image"][3, 2, 2, 0] = np.nan
    state, m = step(state, par.shard_batch(good))
    assert int(m["nonfinite"]) == 0
    before = jax.tree.map(np.asarray, par.host_state(state))
    for i in (1, 2, 3):
        state, m = step(state, par.shard_batch(bad))
        assert int(m["nonfinite"]) == i
        host = par.host_state(state)
        assert int(host.nonfinite) == i and int(host.step) == 1 + i
    host = jax.tree.map(np.asarray, par.host_state(state))
    assert max_diff(before.params, host.params) == 0.0
    assert max_diff(before.batch_stats, host.batch_stats) == 0.0
    for a, b in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(host.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, par.shard_batch(good))
    assert int(m["nonfinite"]) == 0
    assert max_diff(before.params, par.host_state(state).params) > 0


def test_bf16_compute_keeps_float32_params_and_state():
    data = batches(1)
    rules = [(".*", optax.adam(1e-3))]
    model = cnn()
    loss = losses.get("softmax_xent")
    state32 = train.create_train_state(init(model), rules)
    state16 = train.create_train_state(init(model), rules)
    step32 = train.make_train_step(model, rules, loss, donate=False)
    step16 = train.make_train_step(model, rules, loss, compute_dtype=jnp.bfloat16, donate=False)
    batch = parallel.shard_batch(data[0], "none")
    # The convolutions and the head run in bfloat16.
    jaxpr = str(jax.make_jaxpr(step16)(state16, batch))
    assert "conv_general_dilated" in jaxpr and "bf16[32,8,8,8]" in jaxpr
    s32, m32 = step32(state32, batch)
    s16, m16 = step16(state16, batch)
    for leaf in jax.tree.leaves((s16.trainable, s16.opt_state, s16.batch_stats)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert m16["loss"].dtype == jnp.float32
    assert float(m16["loss"]) != float(m32["loss"])
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 2e-2 * abs(float(m32["loss"]))
    assert max_diff(s16.params, s32.params) <= 2e-3  # one Adam step of 1e-3


def test_step_metrics():
    schedule = optax.linear_schedule(1e-2, 0.0, 10)
    rules = [(".*", optax.sgd(schedule))]
    model = mlp()
    state = train.create_train_state(init(model), rules)
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), learning_rate=schedule)
    _, m = step(state, parallel.shard_batch(batches(1)[0], "none"))
    assert set(m) >= {"loss", "lr", "grad_norm", "update_norm", "param_norm", "nonfinite"}
    assert np.isclose(float(m["update_norm"]), 1e-2 * float(m["grad_norm"]), rtol=1e-5)


def test_batchnorm_settings_reach_the_model_as_clone_attributes():
    # One mechanism for both BatchNorm settings: the step clones the model with
    # frozen_bn (frozen layers keep their statistics) and bn_axis_name (pmap's axis).
    from jft.train import _batch_norm

    model, v = cnn(), init(cnn())
    rules = [("head/.*", optax.sgd(0.1)), (".*", None)]
    got = _batch_norm.for_step(
        model, v["params"], v["batch_stats"], rules, freeze_bn=True, axis_name="data"
    )
    assert got.frozen_bn == ("backbone/bn1", "backbone/bn2") and got.bn_axis_name == "data"
    assert model.frozen_bn == () and model.bn_axis_name is None  # the caller's model is untouched
    same = _batch_norm.for_step(model, v["params"], {}, rules, freeze_bn=True, axis_name="data")
    assert same is model  # no BatchNorm: nothing to set

    class PlainBN(nn.Module):  # BatchNorm, but no bn_axis_name to set
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    plain = PlainBN()
    pv = init(plain)
    with pytest.raises(ValueError, match="no bn_axis_name attribute.*parallel='jit'"):
        _batch_norm.for_step(
            plain, pv["params"], pv["batch_stats"], LAYOUT_RULES, freeze_bn=True, axis_name="data"
        )
    # Off pmap such a model trains as it is.
    assert (
        _batch_norm.for_step(
            plain, pv["params"], pv["batch_stats"], LAYOUT_RULES, freeze_bn=True, axis_name=None
        )
        is plain
    )


def test_bad_arguments():
    model, rules, loss = mlp(), [(".*", optax.sgd(0.1))], losses.get("mse")
    with pytest.raises(ValueError, match="parallel"):
        train.make_train_step(model, rules, loss, parallel="ddp")
    with pytest.raises(ValueError, match="fsdp"):
        train.make_train_step(model, rules, loss, parallel=parallel.Parallel("pmap", fsdp=True))
    with pytest.raises(ValueError, match="mesh"):
        parallel.Parallel("none", parallel.make_mesh())
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.make_train_step(model, rules, loss, grad_accum_steps=0)
    with pytest.raises(ValueError, match="divide"):
        parallel.shard_batch({"x": np.zeros((12, 2))}, "pmap")
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), grad_accum_steps=3)
    with pytest.raises(ValueError, match="microbatches"):
        step(train.create_train_state(init(model), rules), batches(1)[0])


def ynn_ops(hlo):
    """The HLO op names inside the fusions that XLA:CPU hands to YNNPACK."""
    import re

    called = set(re.findall(r"calls=(%[\w.-]+).*__ynn_fusion", hlo))
    bodies = re.findall(r"^(%[\w.-]+) \((.*?)^}", hlo, re.M | re.S)
    ops = set()
    for name, body in bodies:
        if name in called:
            ops |= set(re.findall(r"= \S+ ([a-z-]+)\(", body))
    return ops


def test_cpu_step_runs_convolutions_on_xla_kernels_and_nests():
    # On the CPU the step is compiled with jft.models.compiler_options(), which keep
    # convolutions out of YNNPACK (3x slower backward passes there) and leave it the
    # reductions; called on tracers the step still works, as a plain jit.
    model, rules = cnn(), [(".*", optax.adam(1e-3))]
    state = train.create_train_state(init(model), rules)
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), donate=False)
    batch = parallel.shard_batch(batches(1)[0], "none")
    assert jft.models.compiler_options() == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
    }
    ops = ynn_ops(step.lower(state, batch).compile().as_text())
    assert "reduce" in ops and "convolution" not in ops
    plain = jax.jit(train.make_train_step(model, rules, losses.get("softmax_xent"), jit=False))
    assert "convolution" in ynn_ops(plain.lower(state, batch).compile().as_text())
    nested, _ = jax.jit(step)(state, batch)
    direct, _ = step(state, batch)
    leaves = zip(jax.tree.leaves(nested.trainable), jax.tree.leaves(direct.trainable), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_without_norms_makes_the_same_update():
    model, rules = cnn(), [(".*", optax.adam(1e-3))]
    data = batches(3)
    results = []
    for norms in (True, False):
        state = train.create_train_state(init(model), rules)
        step = train.make_train_step(model, rules, losses.get("softmax_xent"), norms=norms)
        for b in data:
            state, m = step(state, parallel.shard_batch(b, "none"))
        results.append((state, m))
    (with_norms, m1), (without, m2) = results
    assert {"grad_norm", "update_norm", "param_norm"} <= set(m1)
    assert not {"grad_norm", "update_norm", "param_norm"} & set(m2)
    assert float(m1["update_norm"]) > 0 and float(m1["loss"]) == float(m2["loss"])
    assert max_diff(with_norms.trainable, without.trainable) == 0


def test_step_reads_text_inputs_and_hf_labels_off_the_batch():
    # No `inputs=`: a text batch's input_ids/attention_mask reach the model as
    # keywords, and Hugging Face's "labels" key is the target (a new user's path).
    model = jft.models.get(
        "bert", num_classes=2, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        intermediate_size=32, max_position_embeddings=16, dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 50, (8, 6)).astype(np.int32),
        "attention_mask": np.ones((8, 6), np.int32),
        "labels": rng.integers(0, 2, 8).astype(np.int32),
    }
    variables = jax.jit(model.init)(jax.random.key(0), batch["input_ids"])
    rules = [(".*", optax.sgd(0.1))]
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), donate=False)
    state = train.create_train_state(variables, rules)
    _, metrics = step(state, batch)
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"])
    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    assert np.isclose(float(metrics["loss"]), float(want), rtol=1e-5)
    with pytest.raises(KeyError, match="no labels"):
        step(state, {k: v for k, v in batch.items() if k != "labels"})
