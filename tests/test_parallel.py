"""jft.train: losses, masked eval metrics in each parallel mode (as sklearn), placement, hosts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

import jft.models
from jft import train
from jft.train import distributed, losses, metrics, parallel


def test_softmax_xent_integer_one_hot_and_smoothing():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 4, 0])
    one_hot = jax.nn.one_hot(labels, 5)
    loss = losses.get("softmax_xent")
    want = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1))
    assert np.isclose(loss(logits, {"label": labels}), want, atol=1e-6)
    assert np.isclose(loss(logits, {"label": one_hot}), want, atol=1e-6)
    smooth = losses.get("softmax_xent", label_smoothing=0.1)
    target = 0.9 * one_hot + 0.1 / 5
    want = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1))
    assert np.isclose(smooth(logits, {"label": labels}), want, atol=1e-6)
    assert np.isclose(smooth(logits, {"label": one_hot}), want, atol=1e-6)


def test_sigmoid_xent_and_mse():
    x = jnp.asarray([[0.5], [-1.0], [2.0]])
    y = jnp.asarray([1, 0, 0])
    p = jax.nn.sigmoid(x[:, 0])
    want = -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))
    assert np.isclose(losses.get("sigmoid_xent")(x, {"label": y}), want, atol=1e-6)
    t = y * 0.8 + 0.1
    want = -jnp.mean(t * jnp.log(p) + (1 - t) * jnp.log(1 - p))
    got = losses.get("sigmoid_xent", label_smoothing=0.2)(x, {"label": y})
    assert np.isclose(got, want, atol=1e-6)
    mse = losses.get("mse", label_smoothing=0.0)
    assert np.isclose(mse(x, {"label": jnp.asarray([0.5, 0.0, 0.0])}), (1 + 4) / 3, atol=1e-6)


def test_mask_weights_the_mean_and_unknown_names():
    x = jnp.asarray([[1.0], [2.0], [100.0]])
    batch = {"label": jnp.zeros(3), "mask": jnp.asarray([True, True, False])}
    assert np.isclose(losses.get("mse")(x, batch), 2.5)
    with pytest.raises(ValueError, match="known: causal_lm_xent, mse, sigmoid_xent, softmax_xent"):
        losses.get("hinge")
    with pytest.raises(ValueError, match="mse"):
        losses.get("mse", label_smoothing=0.1)


@pytest.mark.devices(8)
@pytest.mark.parametrize("mode", ["none", "jit", "pmap"])
def test_eval_metrics_on_a_padded_batch_equal_sklearn(mode):
    model = jft.models.get("mlp", widths=(16,), num_classes=7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 8, 1)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    state = train.create_train_state(variables, [(".*", optax.sgd(0.1))])
    par = parallel.Parallel(mode)
    state = par.place_state(state)
    step = metrics.make_eval_step(model, num_classes=7, parallel=par, top_k=(1, 3))
    labels = rng.integers(0, 7, 48).astype(np.int32)
    valid = 40  # two batches of 24; the second one's last 8 rows are padding
    mask = np.arange(48) < valid
    total = None
    for rows in (slice(0, 24), slice(24, 48)):
        batch = {"image": x[rows], "label": labels[rows], "mask": mask[rows]}
        if rows.start:
            batch["label"] = np.where(batch["mask"], batch["label"], 99)  # garbage in padding
        total = metrics.accumulate(total, step(state, par.shard_batch(batch)))
    got = metrics.finalize(total)

    logits = np.asarray(model.apply(variables, x[:valid]))
    y, pred = labels[:valid], logits.argmax(-1)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    want_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert got["count"] == valid
    assert np.isclose(got["loss"], want_loss, atol=1e-5)
    assert np.isclose(got["accuracy"], skm.accuracy_score(y, pred))
    top3 = skm.top_k_accuracy_score(y, logits, k=3, labels=np.arange(7))
    assert np.isclose(got["top_3"], top3)
    assert np.isclose(got["precision"], p) and np.isclose(got["recall"], r)
    assert np.isclose(got["f1"], f)
    np.testing.assert_array_equal(
        got["confusion_matrix"], skm.confusion_matrix(y, pred, labels=np.arange(7))
    )


@pytest.mark.devices(8)
def test_shard_batch_shapes():
    batch = {"image": np.zeros((16, 3), np.float32), "label": np.arange(16)}
    assert parallel.shard_batch(batch, "pmap")["image"].shape == (8, 2, 3)
    sharded = parallel.shard_batch(batch, "jit")["label"]
    assert sharded.shape == (16,) and sharded.addressable_shards[3].data.tolist() == [6, 7]
    state = parallel.place_state({"w": np.ones(3)}, "pmap")
    assert state["w"].shape == (8, 3)
    assert parallel.host_state(state, "pmap")["w"].shape == (3,)


def test_distributed_settings_from_config_and_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize(None) is False  # one process: nothing to do
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    s = distributed.settings({"distributed": {"process_id": 3}})
    assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="process_id missing"):
        distributed.initialize({"distributed": {}})
