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


@pytest.mark.parametrize(
    "size, channels, stride, path",
    [
        (2, 512, 1, "taps"),
        (1, 256, 1, "taps"),
        (4, 256, 1, "taps"),
        (2, 128, 2, "strided"),
        (8, 64, 1, "xla"),
        (16, 3, 2, "xla"),
    ],
)
def test_conv_cpu_paths_equal_lax_conv(size, channels, stride, path):
    # On CPU, jft.models.layers.conv_general_dilated computes a stride-1 conv onto a
    # map of at most 4x4 as per-tap matmuls and a strided conv with a custom VJP;
    # others are XLA's. Values and gradients must be XLA's.
    import flax.linen as nn

    from jft.models.layers import conv_general_dilated

    x = jax.random.normal(jax.random.key(0), (4, size, size, channels))
    kw = dict(
        features=channels,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=False,
    )
    plain, fast = nn.Conv(**kw), nn.Conv(**kw, conv_general_dilated=conv_general_dilated)
    variables = plain.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(fast.apply)(variables, x))
    found = "strided" if "custom_vjp" in jaxpr else "taps" if "dot_general" in jaxpr else "xla"
    assert found == path
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), atol=2e-5)
    g_plain = jax.grad(lambda v, x: plain.apply(v, x).sum(), argnums=(0, 1))(variables, x)
    g_fast = jax.grad(lambda v, x: fast.apply(v, x).sum(), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "size, cin, cout, kernel, stride, padding",
    [
        (16, 8, 16, 3, 2, ((1, 1), (1, 1))),
        (32, 8, 8, 7, 2, ((3, 3), (3, 3))),
        (8, 8, 16, 1, 2, ((0, 0), (0, 0))),
        (4, 64, 128, 3, 2, ((1, 1), (1, 1))),
        (9, 8, 4, 3, 2, "VALID"),
        (3, 4, 8, 3, 1, ((2, 0), (0, 2))),
        (3, 4, 8, 3, 1, "VALID"),
    ],
)
def test_conv_cpu_gradients_equal_xla(size, cin, cout, kernel, stride, padding):
    # On CPU a strided conv's gradients, and every gradient of a conv onto a tiny
    # map, are computed by jft as per-tap matmuls; they must equal XLA's own.
    import flax.linen as nn

    from jft.models.layers import conv_general_dilated

    x = jax.random.normal(jax.random.key(0), (4, size, size, cin))
    kw = dict(
        features=cout, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding
    )
    plain, fast = nn.Conv(**kw), nn.Conv(**kw, conv_general_dilated=conv_general_dilated)
    variables = plain.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(fast.apply)(variables, x))
    assert "custom_vjp" in jaxpr or "conv_general_dilated" not in jaxpr

    def grads(model):
        return jax.grad(lambda v, x: (model.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [
        ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
        ((2, 9, 9, 3), (2, 2), (2, 2), "VALID"),
        ((2, 16, 16, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
        ((2, 7, 7, 2), (3, 3), (3, 3), "VALID"),
    ],
)
def test_max_pool_equals_flax(shape, window, stride, padding):
    # Rounded ReLU outputs: many windows hold several equal maxima, and the
    # gradient must still go where select-and-scatter puts it (the first one).
    import flax.linen as nn

    from jft.models.layers import max_pool

    x = jax.nn.relu(jnp.round(2 * jax.random.normal(jax.random.key(0), shape)))
    y = max_pool(x, window, stride, padding)
    np.testing.assert_array_equal(y, nn.max_pool(x, window, stride, padding=padding))
    w = jax.random.normal(jax.random.key(1), y.shape)
    g_ref = jax.grad(lambda x: (nn.max_pool(x, window, stride, padding=padding) * w).sum())(x)
    g = jax.grad(lambda x: (max_pool(x, window, stride, padding) * w).sum())(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_train_equals_flax(dtype):
    # jft's BatchNorm writes its train-mode backward pass out; outputs, running
    # statistics and gradients must be nn.BatchNorm's.
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
