"""reduce_on_plateau against torch.optim.lr_scheduler.ReduceLROnPlateau, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jft import optim


def torch_scales(metrics, **kwargs):
    """torch's lr / initial lr after each step, for an optimizer with lr 1."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    out = []
    for m in metrics:
        sched.step(m)
        out.append(opt.param_groups[0]["lr"] / 1.0)
    return np.array(out)


def jft_scales(metrics, tx):
    update = jax.jit(tx.update)
    params = jnp.zeros(2)
    state = tx.init(params)
    out = []
    for m in metrics:
        updates, state = update(jnp.ones(2), state, params, value=m)
        assert float(updates[0]) == float(state.scale)  # the updates are scaled
        out.append(float(state.scale))
    assert update._cache_size() == 1
    return np.array(out)


rng = np.random.default_rng(0)
# Quantized to 1/64 so that no comparison sits on a float32 rounding boundary.
_noisy = np.round((5.0 - 0.03 * np.arange(80) + 0.4 * rng.normal(size=80)) * 64) / 64
_walk = np.round(np.cumsum(rng.normal(size=80)) * 64) / 64

SEQUENCES = {
    "decreasing": 10.0 - 0.1 * np.arange(40),
    "noisy": _noisy,
    "plateaus": np.repeat([5.0, 4.0, 4.0002, 3.0, 3.0, 2.99999], 12),
    # Negative metrics with the relative threshold: torch's a < b·(1 − τ) counts a
    # constant negative metric as better every step (b·(1 − τ) > b), so it never
    # reduces; optax's contrib version does.
    "negative_constant": np.full(40, -10.0),
    "negative_decreasing": -1.0 - 0.001 * np.arange(60),
    "negative_plateaus": np.repeat([-1.0, -2.0, -1.5, -2.0, -2.0001], 12),
    "random_walk": _walk,
    "crossing_zero": np.repeat([2.0, 0.5, 0.0, -0.5, -0.49, -2.0], 10),
}

CONFIGS = {
    "default": {},
    "patience2": {"patience": 2},
    "patience0_factor_half": {"patience": 0, "factor": 0.5},
    "max": {"mode": "max", "patience": 2},
    "max_abs": {"mode": "max", "patience": 3, "threshold_mode": "abs", "threshold": 0.1},
    "abs": {"threshold_mode": "abs", "threshold": 0.05, "patience": 3},
    "cooldown": {"patience": 1, "cooldown": 3, "factor": 0.5},
    "min_scale": {"patience": 1, "factor": 0.3, "min_scale": 0.05},
    "big_threshold": {"threshold": 0.2, "patience": 2, "factor": 0.7},
}


def _to_torch(cfg):
    cfg = dict(cfg)
    if "min_scale" in cfg:
        cfg["min_lr"] = cfg.pop("min_scale")  # initial lr is 1
    return cfg


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_equals_torch_on_every_sequence(config):
    cfg = CONFIGS[config]
    tx = optim.reduce_on_plateau(**cfg)
    reductions = 0
    for name, seq in SEQUENCES.items():
        seq = [float(x) for x in seq]
        want = torch_scales(seq, **_to_torch(cfg))
        got = jft_scales(seq, tx)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{config} on {name}")
        reductions += int(want[-1] < 1)
    assert reductions > 0  # each config is exercised, not only the "never reduce" path


def test_max_mode_is_min_of_the_negated_metric_only_with_abs_threshold():
    # With the relative threshold the two differ (torch multiplies by 1 ± τ).
    seq = [float(x) for x in SEQUENCES["random_walk"]]
    neg = [-x for x in seq]
    up = jft_scales(seq, optim.reduce_on_plateau(0.5, 2, mode="max", threshold_mode="abs"))
    down = jft_scales(neg, optim.reduce_on_plateau(0.5, 2, mode="min", threshold_mode="abs"))
    np.testing.assert_array_equal(up, down)


def test_negative_constant_metric_never_reduces_like_torch():
    seq = [-10.0] * 30
    assert torch_scales(seq, patience=2)[-1] == 1.0
    assert jft_scales(seq, optim.reduce_on_plateau(patience=2))[-1] == 1.0


@pytest.mark.parametrize(
    "rule",
    [optim.adam(1e-2), optim.heavy_ball(0.1), optim.rmsprop(1e-2, momentum=0.9), optim.sgd(0.1)],
    ids=["adam", "heavy_ball", "rmsprop", "sgd"],
)
def test_chains_after_any_rule(rule):
    tx = optax.chain(rule, optim.reduce_on_plateau(factor=0.5, patience=1))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"a": jnp.ones(3), "b": jnp.arange(4.0)}
    grads = jax.tree.map(lambda x: 0.1 * x + 1.0, params)
    update = jax.jit(tx.update)
    state, ref_state = tx.init(params), rule.init(params)
    for loss in [3.0, 2.0, 2.0, 2.0, 2.0, 2.0]:
        updates, state = update(grads, state, params, value=loss)
        ref, ref_state = rule.update(grads, ref_state, params)
        scale = float(state[1].scale)
        for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(u, scale * r, rtol=1e-6)
    assert scale == 0.25  # patience 1: reduced at the 2nd and the 4th bad step


def test_state_is_float32_and_int32_and_keeps_bf16_updates():
    tx = optim.reduce_on_plateau()
    p = jnp.ones(3, jnp.bfloat16)
    state = tx.init(p)
    assert state.scale.dtype == jnp.float32 and state.best.dtype == jnp.float32
    assert state.num_bad_steps.dtype == jnp.int32 and state.cooldown_count.dtype == jnp.int32
    updates, state = tx.update(p, state, p, value=jnp.asarray(1.0, jnp.bfloat16))
    assert updates.dtype == jnp.bfloat16
    assert state.scale.dtype == jnp.float32


def test_under_inject_hyperparams():
    tx = optax.inject_hyperparams(optim.reduce_on_plateau)(factor=0.5, patience=1)
    p = jnp.zeros(2)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for loss in [1.0, 1.0, 1.0]:
        _, state = update(jnp.ones(2), state, p, value=loss)
    assert float(state.inner_state.scale) == 0.5
    state.hyperparams["factor"] = jnp.asarray(0.1)
    for loss in [1.0, 1.0]:
        _, state = update(jnp.ones(2), state, p, value=loss)
    np.testing.assert_allclose(float(state.inner_state.scale), 0.05, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": -0.1}, "factor"),
        ({"patience": -1}, "patience"),
        ({"threshold": float("nan")}, "threshold"),
        ({"cooldown": -2}, "cooldown"),
        ({"min_scale": -1.0}, "min_scale"),
        ({"mode": "maximum"}, "mode"),
        ({"threshold_mode": "relative"}, "threshold_mode"),
        ({"threshold": float("inf")}, "threshold"),
        ({"patience": float("inf")}, "patience"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(optim.HyperparameterError, match=rf"\b{name}\b") as err:
        optim.reduce_on_plateau(**kwargs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_integer_parameters_raise():
    with pytest.raises(optim.ParameterDtypeError, match=r"reduce_on_plateau: parameter 'w'"):
        optim.reduce_on_plateau().init({"w": jnp.ones(2, jnp.int8)})
