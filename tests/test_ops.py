"""jft.ops: the CPU formulations equal XLA's own ops, and other platforms only see XLA's.

Property tests draw convolutions, max pools and BatchNorms from the whole input
space the models use (maps 1-17 pixels, strides 1-3, kernels 1-7, SAME, VALID
and explicit asymmetric padding, 1-16 and >=128 channels, float32 and
bfloat16) and compare values and gradients, computed under ``jax.jit`` on the
CPU (where the CPU formulations run), with ``lax``/``flax``. Hypothesis runs
derandomized (the same examples every run, no example database) so CI is
reproducible; ``max_examples`` keeps the file near a minute on 2 busy cores.

Tolerances are derived, not tuned. A float sum of K products computed in two
orders differs by at most ``2 K u sum|a_i b_i|`` (u the unit roundoff: 2^-24
for float32 accumulation), and that bound is itself computed exactly as the
op on ``|x|``, ``|w|``, ``|g|``. A bfloat16 result is rounded to 2^-8 once per
partial result it passes through in bfloat16 (one per kernel tap for the
per-tap convolutions, plus the output), so bf16 adds ``2 (taps + 1) 2^-8``
times the same bound.
"""

from __future__ import annotations

import collections
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jft.models
import jft.ops
from jft import train
from jft.train import losses

U32, U16 = 2.0**-24, 2.0**-8
SETTINGS = dict(deadline=None, derandomize=True, database=None)
NHWC = ("NHWC", "HWIO", "NHWC")


def _unit(dtype) -> float:
    return U16 if dtype == jnp.bfloat16 else U32


def _normal(rng, shape, dtype=jnp.float32):
    # NumPy draws: jax.random would compile its generator anew for every shape.
    return jnp.asarray(rng.normal(size=shape), dtype)


def _assert_within(name, ours, ref, bound):
    ours, ref, bound = (np.asarray(a, np.float64) for a in (ours, ref, bound))
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    excess = np.abs(ours - ref) - bound
    assert excess.max(initial=0) <= 0, (
        f"{name}: |jft - lax| exceeds its bound by {excess.max():.3g} "
        f"(max |lax| {np.abs(ref).max():.3g})"
    )


# --- Convolutions -------------------------------------------------------------

CHANNELS = st.one_of(st.integers(1, 16), st.sampled_from([128, 131]))
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])


@st.composite
def conv_cases(draw):
    h, w = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    if kind == "explicit":
        padding = tuple((draw(st.integers(0, k)), draw(st.integers(0, k))) for k in (kh, kw))
    else:
        padding = kind
    if kind != "SAME":  # a kernel that does not fit its padded map is an error for lax too
        pads = padding if kind == "explicit" else ((0, 0), (0, 0))
        kh, kw = min(kh, h + sum(pads[0])), min(kw, w + sum(pads[1]))
    cin, cout = draw(CHANNELS), draw(CHANNELS)
    return (2, h, w, cin), (kh, kw, cin, cout), stride, padding, draw(DTYPES)


def _conv_values_and_grads(conv, stride, padding, x, w, g):
    def f(x, w):
        return conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)

    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _conv_both(stride, padding, x, w, g):
    ours = _conv_values_and_grads(jft.ops.conv_general_dilated, stride, padding, x, w, g)
    ref = _conv_values_and_grads(jax.lax.conv_general_dilated, stride, padding, x, w, g)
    # The bound's magnitudes: the same op on absolute values, in float32.
    a = [jnp.abs(t).astype(jnp.float32) for t in (x, w, g)]
    mag = _conv_values_and_grads(jax.lax.conv_general_dilated, stride, padding, *a)
    return ours, ref, mag


@settings(max_examples=20, **SETTINGS)
@given(conv_cases())
@example(((2, 4, 4, 3), (3, 3, 3, 5), 2, ((1, 1), (1, 1)), jnp.float32))  # issue 13, bug 2
@example(((2, 2, 2, 128), (3, 3, 128, 128), 1, ((1, 1), (1, 1)), jnp.float32))  # per-tap
@example(((2, 4, 4, 16), (3, 3, 16, 8), 2, ((1, 1), (1, 1)), jnp.bfloat16))  # strided
@example(((2, 3, 3, 4), (3, 3, 4, 8), 1, ((2, 0), (0, 2)), jnp.float32))  # asymmetric
def test_conv_equals_lax_conv(case):
    x_shape, w_shape, stride, padding, dtype = case
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape) + stride)
    x, w = _normal(rng, x_shape, dtype), _normal(rng, w_shape, dtype)
    y_shape = jax.eval_shape(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=NHWC
        ),
        x,
        w,
    ).shape
    g = _normal(rng, y_shape, dtype)
    ours, ref, mag = _conv_both(stride, padding, x, w, g)
    kh, kw, cin, cout = w_shape
    terms = max(kh * kw * max(cin, cout), math.prod(y_shape[:3]))
    rel = 2 * terms * U32 + (2 * (kh * kw + 1) * U16 if dtype == jnp.bfloat16 else 0)
    for name, a, b, m in zip(["value", "d/dx", "d/dw"], ours, ref, mag, strict=True):
        assert a.dtype == b.dtype == dtype
        _assert_within(name, a, b, rel * np.asarray(m))


def test_strided_conv_of_few_channels_keeps_its_stride():
    # Issue 13, bug 2: a strided conv of < 8 channels onto a map whose stride-1
    # output is at most 4x4 took the per-tap path and ignored the stride.
    rng = np.random.default_rng(0)
    x, w = _normal(rng, (2, 4, 4, 3)), _normal(rng, (3, 3, 3, 5))
    args = ((2, 2), ((1, 1), (1, 1)))
    y = jax.jit(lambda x, w: jft.ops.conv_general_dilated(x, w, *args, dimension_numbers=NHWC))
    ref = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=NHWC)
    assert y(x, w).shape == ref.shape == (2, 2, 2, 5)
    np.testing.assert_allclose(y(x, w), ref, rtol=1e-6, atol=1e-6)


def _cpu_hlo_ops(fn, *args):
    # A fresh function each time: jax.jit keeps what it traced, and the switch is
    # read when tracing.
    text = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()
    return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, formulation",
    [
        ((2, 2, 2, 16), (3, 3, 16, 16), 1, "per-tap"),  # stride 1 onto <= 4x4: no convolution
        ((2, 8, 8, 8), (3, 3, 8, 16), 2, "strided"),  # forward only: gradients are matmuls
        ((2, 8, 8, 3), (3, 3, 3, 16), 2, "xla"),  # few channels: XLA's own
        ((2, 8, 8, 8), (3, 3, 8, 16), 1, "xla"),  # a stride-1 conv onto 8x8: XLA's own
    ],
)
def test_cpu_programs_use_the_cpu_formulations(x_shape, w_shape, stride, formulation):
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)

    def grads(x, w):
        f = lambda x, w: jft.ops.conv_general_dilated(
            x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC
        )
        return jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)

    convs = _cpu_hlo_ops(grads, x, w)["convolution"]
    assert convs == {"per-tap": 0, "strided": 1, "xla": 3}[formulation]
    with jft.ops.cpu_kernels(False):
        assert _cpu_hlo_ops(grads, x, w)["convolution"] == 3


# --- Max pooling --------------------------------------------------------------


@st.composite
def pool_cases(draw):
    h, w = draw(st.integers(1, 17)), draw(st.integers(1, 17))
    kh, kw = draw(st.integers(1, min(7, h + 2))), draw(st.integers(1, min(7, w + 2)))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    # Padding below the window, so every window holds a pixel (as PyTorch requires).
    if kind == "explicit":
        padding = tuple(
            (draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in (kh, kw)
        )
    else:
        padding = kind
    if kind != "SAME":
        pads = padding if kind == "explicit" else ((0, 0), (0, 0))
        kh, kw = min(kh, h + sum(pads[0])), min(kw, w + sum(pads[1]))
        if kind == "explicit":  # keep padding below the (possibly shrunk) window
            padding = tuple(
                (min(a, k - 1), min(b, k - 1)) for (a, b), k in zip(padding, (kh, kw), strict=True)
            )
    return (2, h, w, draw(CHANNELS)), (kh, kw), (sh, sw), padding, draw(DTYPES)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pool_both(window, strides, padding, x, g):
    ref_pool = lambda x: nn.max_pool(x, window, strides, padding=padding)
    y, vjp = jax.vjp(lambda x: jft.ops.max_pool(x, window, strides, padding), x)
    y_ref, vjp_ref = jax.vjp(ref_pool, x)
    return y, vjp(g)[0], y_ref, vjp_ref(g)[0], vjp_ref(jnp.abs(g))[0]


@settings(max_examples=20, **SETTINGS)
@given(pool_cases())
@example(((2, 8, 8, 3), (2, 2), (2, 2), "VALID", jnp.float32))  # the CNN's pool
@example(((2, 8, 8, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), jnp.bfloat16))  # ResNet's
def test_max_pool_equals_flax(case):
    # Rounded ReLU outputs: many windows hold several equal maxima, and the
    # gradient must go where select-and-scatter puts it (the first one). Values
    # are exact; an input in several windows sums their cotangents, in any order:
    # at most 2 * (windows per input) * u * sum|g| apart.
    shape, window, strides, padding, dtype = case
    rng = np.random.default_rng(sum(shape) + sum(window))
    x = jnp.asarray(np.maximum(0, np.round(2 * rng.normal(size=shape))), dtype)
    y_shape = jax.eval_shape(lambda x: nn.max_pool(x, window, strides, padding=padding), x).shape
    g = _normal(rng, y_shape, dtype)
    y, dx, y_ref, dx_ref, mag = _pool_both(window, strides, padding, x, g)
    np.testing.assert_array_equal(y, y_ref)
    overlap = math.ceil(window[0] / strides[0]) * math.ceil(window[1] / strides[1])
    _assert_within("d/dx", dx, dx_ref, 2 * overlap * _unit(dtype) * np.asarray(mag, np.float64))


def test_max_pool_of_more_than_128_taps():
    # The first argmax of a 12x12 window is a tap index up to 143: past int8.
    assert jft.ops.cpu.tap_index_dtype(128) == np.int8
    assert jft.ops.cpu.tap_index_dtype(129) == np.int16
    rng = np.random.default_rng(0)
    x, g = _normal(rng, (2, 24, 24, 3)), _normal(rng, (2, 2, 2, 3))
    y, dx, y_ref, dx_ref, _ = _pool_both((12, 12), (12, 12), "VALID", x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert int(jnp.sum(dx != 0)) == g.size  # one maximum per window, late taps included
    # Overlapping windows (stride 5): each input sums the cotangents of its windows.
    g = _normal(rng, (2, 3, 3, 3))
    y, dx, y_ref, dx_ref, mag = _pool_both((12, 12), (5, 5), "VALID", x, g)
    np.testing.assert_array_equal(y, y_ref)
    _assert_within("d/dx", dx, dx_ref, 2 * 9 * U32 * np.asarray(mag))


# --- BatchNorm ----------------------------------------------------------------


@st.composite
def bn_cases(draw):
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return (*shape, draw(CHANNELS)), draw(st.floats(-4, 4)), draw(DTYPES)


@jax.jit
def _bn_both(x, scale, bias, g):
    def ours(x, scale, bias):  # cast to x's dtype as jft's and flax's BatchNorm layers do
        y, mean, var = jft.ops.batch_norm_train(x, scale, bias, epsilon=1e-5)
        return y.astype(x.dtype), mean, var

    def ref(x, scale, bias):
        v = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
        y, upd = ref_bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

    ref_bn = nn.BatchNorm(momentum=0.0, epsilon=1e-5, dtype=x.dtype)
    stats = {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}
    out, vjp = jax.vjp(ours, x, scale, bias)
    out_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
    zeros = [jnp.zeros_like(s) for s in out[1:]]
    return out, vjp((g, *zeros)), out_ref, vjp_ref((g, *zeros))


@settings(max_examples=15, **SETTINGS)
@given(bn_cases())
@example(((8, 5, 5, 16), 3.0, jnp.float32))
@example(((8, 5, 5, 16), 3.0, jnp.bfloat16))
def test_batch_norm_train_equals_flax(case):
    # Output, batch statistics and gradients of nn.BatchNorm's train mode. The
    # gradient dx = scale*rstd*(dy - mean(dy) - xhat*mean(dy*xhat)) is computed by
    # jft in that form and by autodiff in another: each differs from the exact by
    # at most M*u times the sum of its terms' magnitudes (M = N*H*W summands), and
    # the variance E[x^2] - E[x]^2 loses (1 + |mean|/std)^2 of it to cancellation.
    shape, offset, dtype = case
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(offset + 2 * rng.normal(size=shape), dtype)
    scale, bias = 1 + _normal(rng, shape[-1:]), _normal(rng, shape[-1:])
    g = _normal(rng, shape, dtype)
    (y, mean, var), (dx, dscale, dbias), (y_r, mean_r, var_r), (dx_r, dscale_r, dbias_r) = _bn_both(
        x, scale, bias, g
    )
    assert y.dtype == y_r.dtype == dx.dtype == dtype
    m = math.prod(shape[:-1])
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    mu, sd = x64.mean((0, 1, 2)), x64.std((0, 1, 2))
    rstd = 1 / np.sqrt(sd**2 + 1e-5)
    xhat = (x64 - mu) * rstd
    cancel = (1 + np.abs(mu) * rstd) ** 2
    rel = 4 * (m + 8) * U32 * cancel
    out_rel = rel + 2 * _unit(dtype)
    s = np.abs(np.asarray(scale, np.float64))
    _assert_within("y", y, y_r, out_rel * (s * (np.abs(xhat) + 1) + np.abs(np.asarray(bias))))
    _assert_within("mean", mean, mean_r, rel * np.abs(x64).mean((0, 1, 2)))
    _assert_within("var", var, var_r, rel * (x64**2).mean((0, 1, 2)))
    dy_terms = (
        np.abs(g64)
        + np.abs(g64).mean((0, 1, 2))
        + np.abs(xhat) * np.abs(g64 * xhat).mean((0, 1, 2))
    )
    _assert_within("d/dx", dx, dx_r, out_rel * s * rstd * dy_terms)
    _assert_within("d/dscale", dscale, dscale_r, rel * np.abs(g64 * xhat).sum((0, 1, 2)))
    _assert_within("d/dbias", dbias, dbias_r, rel * np.abs(g64).sum((0, 1, 2)))


# --- The switch ---------------------------------------------------------------


# --- Dense products -------------------------------------------------------------


@st.composite
def dense_cases(draw):
    lead = tuple(draw(st.lists(st.integers(0, 9), min_size=2, max_size=3)))
    return lead, draw(st.integers(1, 70)), draw(st.integers(1, 70)), draw(DTYPES)


def _dense_values_and_grads(dot, x, w, g):
    def f(x, w):
        return dot(x, w, (((x.ndim - 1,), (0,)), ((), ())))

    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))


@jax.jit
def _dense_both(x, w, g):
    ours = _dense_values_and_grads(jft.ops.dot_general, x, w, g)
    ref = _dense_values_and_grads(jax.lax.dot_general, x, w, g)
    a = [jnp.abs(t).astype(jnp.float32) for t in (x, w, g)]
    return ours, ref, _dense_values_and_grads(jax.lax.dot_general, *a)


@settings(max_examples=25, **SETTINGS)
@given(dense_cases())
@example(((2, 3), 5, 7, jnp.float32))
@example(((2, 0, 4), 3, 2, jnp.bfloat16))  # no rows
def test_dense_product_equals_lax_dot_general(case):
    """A Dense layer's product of (..., D) inputs, value and both gradients, over
    ranks 3-4, empty axes, both dtypes; each output sums the same D (or, for the
    weight gradient, the same rows) terms: within 2 x terms ulps of the magnitudes."""
    lead, d, f, dtype = case
    rng = np.random.default_rng(sum(lead) + d + f)
    x, w, g = (_normal(rng, s, dtype) for s in ((*lead, d), (d, f), (*lead, f)))
    ours, ref, mag = _dense_both(x, w, g)
    terms = max(d, f, math.prod(lead), 1)
    rel = 2 * terms * U32 + (4 * U16 if dtype == jnp.bfloat16 else 0)
    for name, a, b, m in zip(["value", "d/dx", "d/dw"], ours, ref, mag, strict=True):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        _assert_within(name, a, b, rel * np.asarray(m))


def test_dense_product_is_2d_on_the_cpu_only():
    """The CPU program's products are 2-D; GPU and TPU programs are lax's own."""
    x, w = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5))

    def grad(dot):
        return jax.grad(lambda x, w: jnp.sum(dot(x, w, (((2,), (0,)), ((), ()))) ** 2), (0, 1))

    def dots(dot, platform):
        text = jax.export.export(jax.jit(grad(dot)), platforms=[platform])(x, w).mlir_module()
        return re.findall(r"stablehlo\.dot_general.*?tensor<([0-9x]+)xf32>", text)

    assert all(s.count("x") == 1 for s in dots(jft.ops.dot_general, "cpu"))
    assert any(s.count("x") == 2 for s in dots(jax.lax.dot_general, "cpu"))
    for platform in ("cuda", "tpu"):
        assert dots(jft.ops.dot_general, platform) == dots(jax.lax.dot_general, platform)


def test_switch_turns_the_cpu_formulations_and_options_off(monkeypatch):
    x = jnp.ones((2, 2, 2, 16))
    w = jnp.ones((3, 3, 16, 16))

    def f(x, w):
        return jft.ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    assert jft.ops.cpu_kernels_enabled()
    assert _cpu_hlo_ops(f, x, w)["convolution"] == 0
    assert jft.ops.compiler_options("cpu") == jft.ops.cpu.YNN_OPTIONS
    with jft.ops.cpu_kernels(False):
        assert not jft.ops.cpu_kernels_enabled()
        assert _cpu_hlo_ops(f, x, w)["convolution"] == 1
        assert jft.ops.compiler_options("cpu") == {}
    assert jft.ops.cpu_kernels_enabled()
    assert jft.ops.compiler_options("gpu") == {}
    # The environment variable is read when the switch is first consulted.
    monkeypatch.setattr(jft.ops.switch, "_enabled", None)
    monkeypatch.setenv("JFT_CPU_KERNELS", "0")
    assert not jft.ops.cpu_kernels_enabled()
    assert _cpu_hlo_ops(f, x, w)["convolution"] == 1
    monkeypatch.setattr(jft.ops.switch, "_enabled", None)
    monkeypatch.setenv("JFT_CPU_KERNELS", "maybe")
    with pytest.raises(jft.ops.KernelSwitchError, match="JFT_CPU_KERNELS='maybe'.*set it to 1"):
        jft.ops.cpu_kernels_enabled()
    monkeypatch.setattr(jft.ops.switch, "_enabled", None)
    monkeypatch.delenv("JFT_CPU_KERNELS")
    assert jft.ops.cpu_kernels_enabled()


def test_compiler_options_fall_back_when_jaxlib_rejects_them():
    # Probed by compiling a trivial function: an option this jaxlib does not know
    # (or a value it does not take) gives no options rather than failing every step.
    assert jft.ops.cpu.supported_options(jft.ops.cpu.YNN_OPTIONS) == jft.ops.cpu.YNN_OPTIONS
    assert jft.ops.cpu.supported_options({"xla_cpu_no_such_option": "1"}) == {}
    assert jft.ops.cpu.supported_options({"xla_cpu_experimental_ynn_fusion_type": "NOPE"}) == {}


# --- Exports for other platforms ----------------------------------------------

POOL_AND_CONV = ("convolution", "reduce_window", "select_and_scatter")
# platform_dependent adds single-branch `case`s, their `return`s, the platform
# index's constants and the zero residuals of the branch not taken (broadcasts).
DISPATCH = {"case", "return", "constant", "broadcast_in_dim"}


def _export_ops(fn, args, platform):
    jitted = jax.jit(lambda *a: fn(*a))  # traced afresh, under the switch as it is now
    text = jax.export.export(jitted, platforms=[platform])(*args).mlir_module()
    return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))


def _model_grad(model):
    def loss(params, batch_stats, x):
        v = {"params": params, "batch_stats": batch_stats}
        y, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    return jax.grad(loss, argnums=(0, 2))


MODELS = {
    "resnet": (
        lambda: jft.models.get(
            "resnet", stage_sizes=(1, 1, 1, 1), width=8, stem_width=8, num_classes=3
        ),
        (2, 16, 16, 3),
    ),
    "cnn": (
        lambda: jft.models.get("cnn", widths=(8, 16), num_classes=3, dropout_rate=0.0),
        (2, 8, 8, 1),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exports_for_gpu_and_tpu_hold_only_xla_ops(name):
    make, shape = MODELS[name]
    model = make()
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    args = (v["params"], v["batch_stats"], jax.ShapeDtypeStruct(shape, jnp.float32))
    grad = _model_grad(model)
    for platform in ("cuda", "tpu"):
        ours = _export_ops(grad, args, platform)
        with jft.ops.cpu_kernels(False):
            plain = _export_ops(grad, args, platform)
        assert {k: n for k, n in ours.items() if k not in DISPATCH} == {
            k: n for k, n in plain.items() if k not in DISPATCH
        }, platform
        assert ours["select_and_scatter"] == ours["reduce_window"] == 1
        assert "optimization_barrier" not in ours and "custom_call" not in ours
    cpu = _export_ops(grad, args, "cpu")
    assert cpu["convolution"] < plain["convolution"]
    assert cpu["select_and_scatter"] == cpu["reduce_window"] == 0


def test_train_step_barriers_are_cpu_only():
    model = jft.models.get("cnn", widths=(8,), num_classes=3)
    rules = [(".*", optax.adam(1e-3))]
    variables = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    state = train.create_train_state(variables, rules)
    step = train.make_train_step(model, rules, losses.get("softmax_xent"), jit=False)
    batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.zeros((4,), jnp.int32)}
    assert _export_ops(step, (state, batch), "cpu")["optimization_barrier"] == 2
    for platform in ("cuda", "tpu"):
        assert _export_ops(step, (state, batch), platform)["optimization_barrier"] == 0
