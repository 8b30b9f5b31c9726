"""optax's own alias checks, run on every jft rule.

The installed optax wheel ships its test module ``optax/_src/alias_test.py``
(it needs absl, scipy and scikit-learn, all in the test extra). Each check
below calls the body of one of its test methods (the function under absl's
parametrization, ``__wrapped__``) with the optimizer lookup ``_get_opt`` bound
to jft's table instead of ``optax.alias``: the objectives, step functions,
compilation log and tolerances are optax's own, so the checks follow the
installed optax. What they cover, per rule:

- ``test_optimization``: the parabola and the Rosenbrock function, in float32
  and complex64 (gradients conjugated, as optax requires), converge in 10,000
  jitted steps, and the step does not recompile on its second call;
- ``test_optimizers_accept_extra_args``: ``update(..., unexpected=1)``;
- ``test_optimizers_can_be_wrapped_in_inject_hyperparams``: the same updates and
  the same state (structure and values) as the plain rule;
- ``test_preserve_dtype``: bf16 and float32 updates keep the gradients' dtype;
- ``test_state_shape_dtype_shard_stability``: params and state keep their
  dtypes over steps in float16 ... complex128;
- ``test_gradient_accumulation``: ``optax.MultiSteps`` returns zero updates
  between its steps.

optax's ``test_explicit_dtype`` is about ``mu_dtype``, which jft's rules do not
take. reduce_on_plateau needs ``value=`` on every update, which optax's bodies
pass only to its own Polyak SGD, so it has its own checks at the end.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax._src.alias_test as optax_alias
import pytest

from jft import optim


def _optax_check(name):
    """optax's ``AliasTest.<name>`` body, looking the rule up in ``RULES``."""
    wrapped = next(
        f.__wrapped__
        for n, f in vars(optax_alias.AliasTest).items()
        if n.rstrip("0123456789") == name and hasattr(f, "__wrapped__")
    )
    scope = dict(wrapped.__globals__, _get_opt=lambda self, opt_name: RULES[opt_name][0])
    body = types.FunctionType(
        wrapped.__code__, scope, wrapped.__name__, wrapped.__defaults__, wrapped.__closure__
    )
    return functools.partial(body, optax_alias.AliasTest())


PARABOLA, ROSENBROCK = optax_alias._setup_parabola, optax_alias._setup_rosenbrock

# name: (factory, kwargs, the (target, dtype) pairs of test_optimization it is not
# expected to reach). The kwargs are optax's for its twins (lr as optax's
# learning_rate; AdamW with optax's weight decay, since 0.01 moves the minimum).
ALL = {(t, d) for t in (PARABOLA, ROSENBROCK) for d in (jnp.float32, jnp.complex64)}
# Plain gradient descent creeps along complex Rosenbrock's valley: 10,000 steps of
# lr 2e-3 end at 0.70+0.68j (optax.sgd(2e-3) ends at the same point), and a larger
# lr oscillates.
NO_COMPLEX_ROSENBROCK = {(ROSENBROCK, jnp.complex64)}
# adaptive_rate refuses complex parameters (tested below).
REAL_ONLY = {(PARABOLA, jnp.complex64), (ROSENBROCK, jnp.complex64)}
# α/√(t+1): steps small enough for Rosenbrock's valley (α ≤ 0.02) add up to too
# short a path in 10,000 steps (0.93 at α = 0.02; α = 0.05 diverges).
NO_ROSENBROCK = {(ROSENBROCK, jnp.float32), (ROSENBROCK, jnp.complex64)}
RULES = {
    "gradient_descent": (optim.gradient_descent, {"lr": 2e-3}, NO_COMPLEX_ROSENBROCK),
    "momentum": (optim.momentum, {"lr": 2e-3, "beta": 0.9}, set()),
    "heavy_ball": (optim.heavy_ball, {"lr": 1e-3, "momentum": 0.9}, set()),
    "heavy_ball_nesterov": (
        optim.heavy_ball,
        {"lr": 5e-4, "momentum": 0.95, "nesterov": True},
        set(),
    ),
    "adaptive_rate": (optim.adaptive_rate, {"lr": 2e-3, "beta": 1e-3}, REAL_ONLY),
    "subgradient": (optim.subgradient, {"lr": 0.5}, NO_ROSENBROCK),
    "adagrad": (optim.adagrad, {"lr": 1.0}, set()),
    "rmsprop": (optim.rmsprop, {"lr": 5e-3}, set()),
    "rmsprop_momentum": (optim.rmsprop, {"lr": 5e-3, "momentum": 0.9}, set()),
    "rmsprop_centered": (optim.rmsprop, {"lr": 5e-3, "centered": True}, set()),
    "adam": (optim.adam, {"lr": 0.1}, set()),
    "adamw": (optim.adamw, {"lr": 0.1, "weight_decay": 1e-4}, set()),
}
NAMES = list(RULES)
OPTIMIZATION = [
    (name, target, dtype)
    for name, (_, _, skip) in RULES.items()
    for target, dtype in sorted(ALL - skip, key=lambda td: (td[0].__name__, td[1].__name__))
]


def _kwargs(name):
    return RULES[name][1]


@pytest.mark.parametrize(
    ("name", "target", "dtype"),
    OPTIMIZATION,
    ids=[f"{n}-{t.__name__[7:]}-{d.__name__}" for n, t, d in OPTIMIZATION],
)
def test_optimization(name, target, dtype):
    _optax_check("test_optimization")(name, _kwargs(name), target, dtype)


def test_every_rule_reaches_parabola_in_float32_and_every_other_in_complex64():
    # The table's exceptions stay exceptions: no rule is left out of everything.
    for name, (_, _, skip) in RULES.items():
        assert (PARABOLA, jnp.float32) not in skip, name
        if name != "adaptive_rate":
            assert (PARABOLA, jnp.complex64) not in skip, name


@pytest.mark.parametrize("target", [PARABOLA, ROSENBROCK], ids=["parabola", "rosenbrock"])
def test_adaptive_rate_refuses_complex_parameters(target):
    with pytest.raises(optim.ParameterDtypeError, match=r"adaptive_rate.*complex64"):
        check = _optax_check("test_optimization")
        check("adaptive_rate", _kwargs("adaptive_rate"), target, jnp.complex64)
    with pytest.raises(TypeError, match=r"scale_by_adaptive_rate.*complex64"):
        optim.scale_by_adaptive_rate(0.1).init(jnp.zeros(2, jnp.complex64))


@pytest.mark.parametrize("name", NAMES)
def test_accepts_extra_args(name):
    _optax_check("test_optimizers_accept_extra_args")(name, _kwargs(name))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_same_state_and_updates(name):
    _optax_check("test_optimizers_can_be_wrapped_in_inject_hyperparams")(name, _kwargs(name))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_preserve_dtype(name, dtype):
    _optax_check("test_preserve_dtype")(name, _kwargs(name), dtype)


# The slowest checks run on one rule of each state structure (not Nesterov's
# variant), float32 aside (test_optimization).
CORE = [n for n in NAMES if n not in ("heavy_ball_nesterov", "rmsprop_centered")]
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float64, jnp.complex64, jnp.complex128)
STABILITY = [
    (name, dtype)
    for name in CORE
    for dtype in DTYPES
    if not (name == "adaptive_rate" and jnp.iscomplexobj(dtype))
]


@pytest.mark.parametrize(
    ("name", "dtype"), STABILITY, ids=[f"{n}-{d.__name__}" for n, d in STABILITY]
)
def test_state_shape_dtype_stability(name, dtype):
    _optax_check("test_state_shape_dtype_shard_stability")(name, _kwargs(name), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", CORE)
def test_multisteps(name, dtype):
    _optax_check("test_gradient_accumulation")(name, _kwargs(name), dtype)


# --------------------------------------------------------------------------- reduce_on_plateau
# The same checks, with value= given on every update.


def _plateau(factor=0.5, patience=2):
    return optax.chain(optim.adam(0.1), optim.reduce_on_plateau(factor, patience=patience))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["float32", "complex64"])
def test_reduce_on_plateau_converges_without_recompiling(dtype):
    x0, target, objective = PARABOLA(dtype)
    tx = _plateau()

    @jax.jit
    def step(x, state):
        value, g = jax.value_and_grad(objective)(x)
        u, state = tx.update(jnp.conj(g), state, x, value=value)
        return optax.apply_updates(x, u), state

    x, state = step(x0, tx.init(x0))
    for _ in range(2000):
        x, state = step(x, state)
    assert step._cache_size() == 1
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=3e-2)
    assert x.dtype == dtype


def test_reduce_on_plateau_inject_hyperparams_same_state_and_updates():
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    plain = optim.reduce_on_plateau(0.5, patience=0)
    injected = optax.inject_hyperparams(optim.reduce_on_plateau)(0.5, patience=0)
    s, si = plain.init(params), injected.init(params)
    for value in [1.0, 2.0, 3.0]:  # two bad steps: the scale drops twice
        u, s = jax.jit(plain.update)(grads, s, params, value=value)
        ui, si = jax.jit(injected.update)(grads, si, params, value=value)
    assert jax.tree.structure(si.inner_state) == jax.tree.structure(s)
    np.testing.assert_allclose(float(s.scale), 0.25)
    for a, b in zip(jax.tree.leaves((ui, si.inner_state)), jax.tree.leaves((u, s)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_reduce_on_plateau_preserves_dtype_and_accumulates(dtype):
    params = jnp.array([1.0, 2.0], dtype)
    grads = 2 * params
    tx = optax.MultiSteps(_plateau(), every_k_schedule=4)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(grads, state, params, value=jnp.float32(1.0))
    assert u.dtype == dtype
    np.testing.assert_array_equal(u, jnp.zeros_like(params))  # between MultiSteps' steps
