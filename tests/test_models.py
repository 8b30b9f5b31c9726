"""jft.models: the registry, shapes, parameter paths, dtypes, train/eval modes, frozen BatchNorm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jft.models

IMAGE_MODELS = {
    "cnn": ((2, 8, 8, 1), {}),
    "resnet18": ((2, 32, 32, 3), {}),
    "resnet34": ((2, 32, 32, 3), {}),
    "resnet50": ((2, 32, 32, 3), {}),
    "vgg16": ((2, 32, 32, 3), {"fc_width": 64}),
}


def _shapes(name, shape, **kwargs):
    model = jft.models.get(name, **kwargs)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _paths(variables):
    return set(traverse_util.flatten_dict(variables, sep="/"))


def test_registry_names():
    assert {"mlp", "cnn", "resnet", "resnet18", "resnet34", "resnet50", "vgg", "vgg16"} <= set(
        jft.models.names()
    )
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet18"):
        jft.models.get("nope")


@pytest.mark.parametrize(
    "name, count",
    # torchvision's parameter counts (1000 classes; BatchNorm statistics excluded).
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
     ("vgg16", 138_357_544)],
)  # fmt: skip
def test_parameter_counts_match_torchvision(name, count):
    _, variables = _shapes(name, (1, 224, 224, 3))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    assert n == count


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
@pytest.mark.parametrize("num_classes", [7, 0])
def test_image_model_output_shapes(name, num_classes):
    shape, kwargs = IMAGE_MODELS[name]
    model, variables = _shapes(name, shape, num_classes=num_classes, **kwargs)
    out = jax.eval_shape(model.apply, variables, jnp.zeros(shape))
    assert out.shape[0] == 2 and out.ndim == 2
    if num_classes:
        assert out.shape[1] == num_classes
        assert {"params/head/kernel", "params/head/bias"} <= _paths(variables)
    else:
        assert not any(p.startswith("params/head") for p in _paths(variables))
    assert all(p.split("/")[1] in ("backbone", "head") for p in _paths(variables))


def test_readable_resnet_paths():
    _, variables = _shapes("resnet50", (1, 32, 32, 3))
    paths = _paths(variables)
    for p in [
        "params/backbone/conv1/kernel",
        "params/backbone/bn1/scale",
        "batch_stats/backbone/bn1/mean",
        "batch_stats/backbone/bn1/var",
        "params/backbone/layer1_0/conv3/kernel",
        "params/backbone/layer1_0/downsample_conv/kernel",
        "params/backbone/layer4_2/bn3/bias",
        "params/head/kernel",
    ]:
        assert p in paths, p
    assert variables["params"]["backbone"]["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_vgg_paths_and_layouts_agree():
    shapes = {}
    for layout in ("torchvision", "timm"):
        _, v = _shapes("vgg16", (1, 224, 224, 3), layout=layout)
        shapes[layout] = jax.tree.map(lambda x: x.shape, v)
    # Keras at 224×224 has the same fc6 kernel: (7, 7, 512, 4096).
    _, v = _shapes("vgg16", (1, 224, 224, 3), layout="keras")
    shapes["keras"] = jax.tree.map(lambda x: x.shape, v)
    assert shapes["torchvision"] == shapes["timm"] == shapes["keras"]
    assert shapes["keras"]["params"]["backbone"]["fc6"]["kernel"] == (7, 7, 512, 4096)
    assert "conv5_3" in shapes["keras"]["params"]["backbone"]


def test_vgg_features_and_no_top():
    model = jft.models.get("vgg16", include_top=False, num_classes=0)
    x = jnp.ones((2, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)
    assert "fc6" not in variables["params"]["backbone"]
    feats = model.apply(variables, x, method="features")
    assert feats.shape == (2, 2, 2, 512)
    np.testing.assert_allclose(model.apply(variables, x), feats.mean(axis=(1, 2)), rtol=1e-6)


def test_mlp_configurations():
    softmax = jft.models.get("mlp", widths=(), num_classes=10, output_activation="softmax")
    x = jnp.ones((3, 128))
    p = softmax.apply(softmax.init(jax.random.key(0), x), x)
    assert p.shape == (3, 10)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)

    sigmoid = jft.models.get(
        "mlp", widths=(64, 64), num_classes=1, activation="tanh", output_activation="sigmoid"
    )
    x = jnp.ones((3, 5))
    variables = sigmoid.init(jax.random.key(0), x)
    assert _paths(variables) == {
        f"params/{m}/{leaf}"
        for m in ("backbone/dense_0", "backbone/dense_1", "head")
        for leaf in ("kernel", "bias")
    }
    p = sigmoid.apply(variables, x)
    assert p.shape == (3, 1) and bool(((p > 0) & (p < 1)).all())

    logits = jft.models.get("mlp", widths=(16,), num_classes=4)
    v = logits.init(jax.random.key(0), jnp.ones((2, 4, 4)))  # flattened
    assert logits.apply(v, jnp.ones((2, 4, 4))).shape == (2, 4)

    with pytest.raises(ValueError, match="output_activation"):
        bad = jft.models.get("mlp", output_activation="relu")
        bad.init(jax.random.key(0), jnp.ones((1, 3)))


def test_bf16_compute_keeps_float32_params():
    model = jft.models.get("resnet18", num_classes=3, dtype=jnp.bfloat16)
    x = jnp.ones((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {np.dtype("float32")}
    assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16


def test_cnn_train_mode_updates_batch_stats_and_uses_dropout():
    model = jft.models.get("cnn", num_classes=10, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    eval1 = model.apply(variables, x)
    np.testing.assert_array_equal(eval1, model.apply(variables, x))
    out, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
    )
    assert out.shape == (4, 10)
    before = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["backbone"]["bn1"]["mean"], before)
    # (B, H, W) grayscale is taken as one channel.
    np.testing.assert_allclose(model.apply(variables, x[..., 0]), eval1, rtol=1e-6)


def test_frozen_bn_uses_and_keeps_running_statistics():
    model = jft.models.get("resnet18", num_classes=2, frozen_bn=("backbone/layer1_0/bn.*",))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    new, old = updates["batch_stats"]["backbone"], variables["batch_stats"]["backbone"]
    for bn in ("bn1", "bn2"):
        np.testing.assert_array_equal(new["layer1_0"][bn]["mean"], old["layer1_0"][bn]["mean"])
        assert not np.allclose(new["layer1_1"][bn]["mean"], old["layer1_1"][bn]["mean"])

    # Everything frozen: train=True computes exactly what eval does.
    frozen = jft.models.get("resnet18", num_classes=2, frozen_bn=(".*",))
    out, _ = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, frozen.apply(variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_train_equals_flax(dtype):
    # jft's BatchNorm layer (jft.ops's kernel on the CPU): outputs, running
    # statistics and gradients must be nn.BatchNorm's. tests/test_ops.py checks
    # the kernel itself over many shapes; this checks the layer around it.
    import flax.linen as nn

    from jft.models.layers import BatchNorm

    x = 3 + 2 * jax.random.normal(jax.random.key(0), (8, 5, 5, 16))
    w = jax.random.normal(jax.random.key(1), x.shape)
    ours, ref = BatchNorm(dtype=dtype), nn.BatchNorm(momentum=0.9, dtype=dtype)
    variables = ref.init(jax.random.key(2), x, use_running_average=True)
    variables = {
        "params": {
            "scale": 1 + variables["params"]["scale"],
            "bias": variables["params"]["bias"] + 1,
        },
        "batch_stats": variables["batch_stats"],
    }

    def loss(model, params, x, **kw):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        y, upd = model.apply(v, x, **kw, mutable=["batch_stats"])
        return (y.astype(jnp.float32) * w).sum(), (y, upd)

    g1, (y1, s1) = jax.grad(lambda p, x: loss(ours, p, x, train=True), (0, 1), has_aux=True)(
        variables["params"], x
    )
    g2, (y2, s2) = jax.grad(
        lambda p, x: loss(ref, p, x, use_running_average=False), (0, 1), has_aux=True
    )(variables["params"], x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert y1.dtype == y2.dtype == dtype
    np.testing.assert_allclose(y1.astype(jnp.float32), y2.astype(jnp.float32), atol=tol)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_one_gelu_table_with_hugging_face_names():
    # Issue 13, part 6: "gelu" is the exact erf GELU everywhere (PyTorch's
    # nn.GELU(), HF's "gelu"), "gelu_new"/"gelu_pytorch_tanh" the tanh approximation.
    import torch

    from jft.models import bert, layers

    x = np.linspace(-4, 4, 81, dtype=np.float32)
    exact = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    tanh = torch.nn.GELU(approximate="tanh")(torch.from_numpy(x)).numpy()
    # float32 erf/tanh differ between XLA and PyTorch by a few ulps; exact and tanh
    # GELU differ by up to 5e-4 (1.5e-4 at x=1), far beyond atol.
    np.testing.assert_allclose(layers.activation("gelu")(x), exact, rtol=1e-6, atol=1e-6)
    for name in ("gelu_new", "gelu_pytorch_tanh"):
        np.testing.assert_allclose(layers.activation(name)(x), tanh, rtol=1e-6, atol=1e-6)
    assert np.abs(exact - tanh).max() > 1e-4
    assert float(layers.activation("gelu")(1.0)) != float(layers.activation("gelu_new")(1.0))
    assert bert.get_activation is layers.activation  # one table, one lookup
    with pytest.raises(layers.ActivationError, match="unknown activation 'gelu_fast'; use one of"):
        layers.activation("gelu_fast")

    # The MLP's "gelu" is the same exact GELU.
    model = jft.models.get("mlp", widths=(4,), num_classes=0, activation="gelu")
    v = model.init(jax.random.key(0), jnp.ones((2, 3)))
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
    dense = v["params"]["backbone"]["dense_0"]
    h = xs @ dense["kernel"] + dense["bias"]
    expected = torch.nn.GELU()(torch.from_numpy(np.array(h))).numpy()
    np.testing.assert_allclose(model.apply(v, xs), expected, rtol=1e-6, atol=1e-6)
