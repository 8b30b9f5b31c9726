"""jft models, partition rules and update rules in a Flax NNX training loop (jft.nnx)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jft.models
import jft.nnx
import jft.optim
from jft import partition, train
from jft.train import losses


def flat(tree):
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32),
        jnp.asarray(rng.integers(0, 5, n), jnp.int32),
    )


def _linen():
    return jft.models.get("mlp", widths=(16,), num_classes=5)


def _nnx_model():
    model = nnx.bridge.ToNNX(_linen(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, jnp.zeros((2, 8, 8, 1)))
    return model


RULES = [("backbone/.*", None), ("head/.*", jft.optim.adam(1e-2))]


def test_nnx_loop_trains_what_jft_train_trains():
    # The same model, weights, rules and batches: an NNX loop through jft.nnx and
    # jft.train's step end with the same parameters, and the frozen ones unchanged.
    model = _nnx_model()
    variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    before = jax.tree.map(np.asarray, variables["params"])
    opt = jft.nnx.optimizer(model, RULES)

    @nnx.jit
    def nnx_step(model, opt, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, opt.wrt))(model)
        opt.update(model, grads)
        return value

    state = train.create_train_state(jax.tree.map(jnp.array, variables), RULES)
    step = train.make_train_step(_linen(), RULES, losses.get("softmax_xent"))
    for seed in range(3):
        x, y = _batch(seed)
        got_loss = nnx_step(model, opt, x, y)
        state, metrics = step(state, {"image": x, "label": y})
        assert np.isclose(float(got_loss), float(metrics["loss"]), rtol=1e-6)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = partition.merge(state.trainable, state.frozen)
    flat_got, flat_want = flat(got), flat(want)
    assert sorted(flat_got) == sorted(flat_want)
    for path, value in flat_want.items():
        np.testing.assert_allclose(flat_got[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
    # Frozen: unchanged, and no optimizer state (Adam's mu and nu for the head only).
    for path, value in flat(before).items():
        if path.startswith("backbone/"):
            np.testing.assert_array_equal(flat_got[path], value, err_msg=path)
        else:
            assert np.max(np.abs(flat_got[path] - value)) > 0, path
    head = sum(int(np.size(x)) for x in jax.tree.leaves(before["head"]))
    moments = [x for x in jax.tree.leaves(nnx.state(opt.opt_state)) if np.size(x) > 1]
    assert sum(int(np.size(x)) for x in moments) == 2 * head


def test_nnx_optimizer_names_an_unmatched_parameter():
    with pytest.raises(partition.PartitionError, match="match no rule"):
        jft.nnx.optimizer(_nnx_model(), [("head/.*", jft.optim.sgd(0.1))])


def test_readme_nnx_example_runs_and_learns():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Flax NNX", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README Flax NNX", "exec"), namespace)
    losses_seen = namespace["losses"]
    assert losses_seen[-1] < 0.8 * losses_seen[0], losses_seen  # the head learns
