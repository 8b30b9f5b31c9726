"""Tests of jft.optim: every rule runs through the same table of checks.

Each rule is checked against a float64 NumPy reference written line by line from
its docstring formula, against its torch.optim twin (float64, 100+ steps, with
a constant learning rate and with a schedule), against optax where optax has the
same rule, for convergence, composition, bf16 dtypes and recompilation.
reduce_on_plateau has its own file, tests/test_reduce_on_plateau.py.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn

import jft
from jft import optim

# --------------------------------------------------------------------------- problem

SHAPES = {"w": (4, 3), "b": (3,), "conv": {"k": (2, 2, 3)}, "s": ()}


def _is_shape(x):
    return isinstance(x, tuple)


def make_problem(seed=0, max_steps=200):
    """Float64 NumPy params and a gradient function ``grad_fn(params, t)``.

    The gradient is that of sum(a/2 (p − c)² + sin(3p)/30) plus fixed "minibatch"
    noise for step t, so the adaptive denominators (RMSProp's centered variance
    above all) stay away from 0 and small rounding differences are not amplified.
    """
    rng = np.random.default_rng(seed)
    leaf = lambda f: jax.tree.map(f, SHAPES, is_leaf=_is_shape)
    params = leaf(lambda s: rng.normal(size=s))
    a = leaf(lambda s: rng.uniform(0.5, 2.0, size=s))
    c = leaf(lambda s: rng.normal(size=s))
    noise = leaf(lambda s: 0.1 * rng.normal(size=(max_steps, *s)))

    def grad_fn(p, t):
        return jax.tree.map(
            lambda p, a, c, n: a * (p - c) + 0.1 * np.cos(3 * p) + n[t], p, a, c, noise
        )

    return params, grad_fn


def sched_factor(t):
    """Schedule shape shared by JAX (t a count array) and torch's LambdaLR (t an int)."""
    return 1.0 / (1.0 + 0.05 * t)


@pytest.fixture
def x64():
    """Float64 in JAX for one test, restored afterwards (never leaks to other files)."""
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- references
# Each reference is one step on one leaf, written from the docstring formula;
# `lr` is the learning rate at step t (t = 0 at the first update), `s` a dict of
# per-leaf state that starts empty.


def gd_ref(lr, t, theta, g, s):
    return theta - lr * g  # θ ← θ − α∇L(θ)


def momentum_ref(beta):
    def step(lr, t, theta, g, s):
        v = beta * s.get("v", 0.0) + (1 - beta) * g  # v ← βv + (1−β)g, v₀ = 0
        s["v"] = v
        return theta - lr * v  # θ ← θ − αv

    return step


def heavy_ball_ref(momentum, nesterov=False):
    def step(lr, t, theta, g, s):
        if nesterov:  # torch's form: b ← μb + g ; θ ← θ − η(g + μb)
            b = momentum * s.get("b", 0.0) + g
            s["b"] = b
            return theta - lr * (g + momentum * b)
        # θ_{t+1} = θ_t − η g_t + α(θ_t − θ_{t−1}), θ_{−1} = θ_0
        prev = s.get("prev", theta)
        s["prev"] = theta
        return theta - lr * g + momentum * (theta - prev)

    return step


def adaptive_rate_ref(beta):
    def step(lr, t, theta, g, s):
        assert np.all(np.abs(1 + beta * g) > 1e-3)  # away from the guard
        return theta - lr * g / (1 + beta * g)  # θ ← θ − α g/(1 + βg)

    return step


def subgradient_ref(lr, t, theta, g, s):
    alpha_t = lr / math.sqrt(t + 1)  # α_t = α/√(t+1)
    return theta - alpha_t * g


def adagrad_ref(eps=1e-10, initial_accumulator_value=0.0):
    def step(lr, t, theta, g, s):
        G = s.get("G", initial_accumulator_value) + g**2  # G ← G + g²
        s["G"] = G
        return theta - lr * g / (np.sqrt(G) + eps)  # θ ← θ − α g/(√G + ε)

    return step


def rmsprop_ref(decay=0.99, eps=1e-8, momentum=0.0, centered=False):
    def step(lr, t, theta, g, s):
        v = decay * s.get("v", 0.0) + (1 - decay) * g**2  # v ← ρv + (1−ρ)g²
        s["v"] = v
        if centered:
            gbar = decay * s.get("gbar", 0.0) + (1 - decay) * g
            s["gbar"] = gbar
            denom = np.sqrt(v - gbar**2) + eps
        else:
            denom = np.sqrt(v) + eps
        if momentum:
            b = momentum * s.get("b", 0.0) + g / denom
            s["b"] = b
            return theta - lr * b
        return theta - lr * g / denom  # θ ← θ − α g/(√v + ε)

    return step


def adam_ref(b1=0.9, b2=0.999, eps=1e-8, weight_decay=None):
    def step(lr, t, theta, g, s):
        if weight_decay is not None:
            theta = theta * (1 - lr * weight_decay)  # decoupled: θ ← θ(1 − αλ)
        m = b1 * s.get("m", 0.0) + (1 - b1) * g
        v = b2 * s.get("v", 0.0) + (1 - b2) * g**2
        s["m"], s["v"] = m, v
        m_hat = m / (1 - b1 ** (t + 1))
        v_hat = v / (1 - b2 ** (t + 1))
        return theta - lr * m_hat / (np.sqrt(v_hat) + eps)

    return step


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    id: str
    make: Callable[..., Any]  # jft factory, called as make(lr, **kwargs)
    kwargs: dict
    lr: float
    ref: Callable  # per-leaf reference step
    torch: Callable | None = None  # (tensors, lr) -> torch optimizer
    torch_factor: Callable = lambda t: 1.0  # extra LambdaLR factor (subgradient)
    optax: Callable | None = None  # lr -> optax twin
    quad: tuple = (0.1, 200)  # (lr, steps) for (θ − 2)² from 0
    rosen: tuple | None = None  # (lr, steps[, kwargs]) for Rosenbrock from (−1.2, 1)
    linear_in_lr: bool = True

    def tx(self, lr=None, **overrides):
        return self.make(self.lr if lr is None else lr, **{**self.kwargs, **overrides})


def _rms_optax(decay, eps, momentum, centered):
    return lambda lr: optax.rmsprop(
        lr, decay, eps, eps_in_sqrt=False, centered=centered, momentum=momentum or None
    )


CASES = [
    Case(
        "gradient_descent",
        optim.gradient_descent,
        {},
        0.05,
        gd_ref,
        torch=lambda ps, lr: torch.optim.SGD(ps, lr=lr),
        optax=lambda lr: optax.sgd(lr),
        quad=(0.1, 100),
        rosen=(2e-3, 20_000),
    ),
    Case(
        "momentum",
        optim.momentum,
        {"beta": 0.8},
        0.05,
        momentum_ref(0.8),
        # No torch twin: SGD(dampening=β) does not damp its first step.
        optax=lambda lr: optax.chain(
            optax.ema(0.8, debias=False), optax.scale_by_learning_rate(lr)
        ),
        quad=(0.1, 300),
        rosen=(2e-3, 20_000),
    ),
    Case(
        "heavy_ball",
        optim.heavy_ball,
        {"momentum": 0.9},
        0.02,
        heavy_ball_ref(0.9),
        torch=lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
        optax=lambda lr: optax.sgd(lr, momentum=0.9),
        quad=(0.05, 300),
        rosen=(5e-4, 10_000),
    ),
    Case(
        "heavy_ball_nesterov",
        optim.heavy_ball,
        {"momentum": 0.8, "nesterov": True},
        0.02,
        heavy_ball_ref(0.8, nesterov=True),
        torch=lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.8, nesterov=True),
        optax=lambda lr: optax.sgd(lr, momentum=0.8, nesterov=True),
        quad=(0.05, 300),
        rosen=(5e-4, 10_000),
    ),
    Case(
        "adaptive_rate",
        optim.adaptive_rate,
        {"beta": 0.05},
        0.05,
        adaptive_rate_ref(0.05),
        # Neither torch nor optax has this rule.
        quad=(0.1, 200),
        # Rosenbrock's gradient at the start is about -200: with beta = 0.05 the
        # denominator 1 + βg is negative and the rule climbs, so a smaller beta.
        rosen=(2e-3, 20_000, {"beta": 1e-3}),
    ),
    Case(
        "subgradient",
        optim.subgradient,
        {},
        0.05,
        subgradient_ref,
        torch=lambda ps, lr: torch.optim.SGD(ps, lr=lr),
        torch_factor=lambda t: 1.0 / math.sqrt(t + 1),
        optax=lambda lr: optax.sgd(lambda t: lr / jnp.sqrt(t + 1.0)),
        quad=(0.5, 1000),
    ),
    Case(
        "adagrad",
        optim.adagrad,
        {},
        0.1,
        adagrad_ref(),
        torch=lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
        # optax.adagrad puts eps inside the sqrt and starts G at 0.1: see adagrad_eps0.
        quad=(1.0, 300),
        rosen=(0.5, 20_000),
    ),
    Case(
        "adagrad_init_acc",
        optim.adagrad,
        {"eps": 1e-6, "initial_accumulator_value": 0.3},
        0.1,
        adagrad_ref(1e-6, 0.3),
        torch=lambda ps, lr: torch.optim.Adagrad(
            ps, lr=lr, eps=1e-6, initial_accumulator_value=0.3
        ),
        quad=(1.0, 300),
    ),
    Case(
        "adagrad_eps0",
        optim.adagrad,
        {"eps": 0.0, "initial_accumulator_value": 0.1},
        0.1,
        adagrad_ref(0.0, 0.1),
        torch=lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=0.0, initial_accumulator_value=0.1),
        # With eps = 0 optax's rsqrt(G + eps) is jft's 1/(√G + eps).
        optax=lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1, eps=0.0),
        quad=(1.0, 300),
    ),
    Case(
        "rmsprop",
        optim.rmsprop,
        {},
        0.01,
        rmsprop_ref(),
        torch=lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
        optax=_rms_optax(0.99, 1e-8, 0.0, False),
        quad=(optax.exponential_decay(0.1, 100, 0.1), 1000),
        rosen=(optax.exponential_decay(0.01, 1000, 0.5), 20_000),
    ),
    Case(
        "rmsprop_momentum",
        optim.rmsprop,
        {"decay": 0.9, "momentum": 0.9},
        0.01,
        rmsprop_ref(0.9, 1e-8, 0.9),
        torch=lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, momentum=0.9),
        optax=_rms_optax(0.9, 1e-8, 0.9, False),
        quad=(optax.exponential_decay(0.01, 100, 0.1), 1000),
    ),
    Case(
        "rmsprop_centered",
        optim.rmsprop,
        {"centered": True, "eps": 1e-6},
        0.01,
        rmsprop_ref(0.99, 1e-6, 0.0, True),
        torch=lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, eps=1e-6, centered=True),
        optax=_rms_optax(0.99, 1e-6, 0.0, True),
        quad=(optax.exponential_decay(0.1, 100, 0.1), 1000),
    ),
    Case(
        "rmsprop_centered_momentum",
        optim.rmsprop,
        {"decay": 0.9, "momentum": 0.5, "centered": True},
        0.01,
        rmsprop_ref(0.9, 1e-8, 0.5, True),
        torch=lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, momentum=0.5, centered=True),
        optax=_rms_optax(0.9, 1e-8, 0.5, True),
        quad=(optax.exponential_decay(0.1, 100, 0.1), 1000),
    ),
    Case(
        "adam",
        optim.adam,
        {},
        0.01,
        adam_ref(),
        torch=lambda ps, lr: torch.optim.Adam(ps, lr=lr),
        optax=lambda lr: optax.adam(lr, eps_root=0.0),
        quad=(optax.exponential_decay(0.1, 300, 0.1), 1000),
        rosen=(optax.exponential_decay(0.02, 2000, 0.5), 10_000),
    ),
    Case(
        "adam_betas",
        optim.adam,
        {"b1": 0.8, "b2": 0.99, "eps": 1e-6},
        0.01,
        adam_ref(0.8, 0.99, 1e-6),
        torch=lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.99), eps=1e-6),
        optax=lambda lr: optax.adam(lr, 0.8, 0.99, 1e-6, eps_root=0.0),
        quad=(optax.exponential_decay(0.1, 300, 0.1), 1000),
    ),
    Case(
        "adamw",
        optim.adamw,
        {},  # torch's default weight_decay 0.01
        0.01,
        adam_ref(weight_decay=0.01),
        torch=lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
        optax=lambda lr: optax.adamw(lr, weight_decay=0.01),
        quad=None,  # weight decay moves the minimum away from 2
    ),
    Case(
        "adamw_wd",
        optim.adamw,
        {"b1": 0.8, "weight_decay": 0.3},
        0.01,
        adam_ref(b1=0.8, weight_decay=0.3),
        torch=lambda ps, lr: torch.optim.AdamW(ps, lr=lr, betas=(0.8, 0.999), weight_decay=0.3),
        optax=lambda lr: optax.adamw(lr, b1=0.8, weight_decay=0.3),
        quad=None,
    ),
]
IDS = [c.id for c in CASES]
# For the composition checks: every factory once, plus the variants whose state
# has another structure.
CORE = [
    c
    for c in CASES
    if c.id
    in {
        "gradient_descent",
        "momentum",
        "heavy_ball_nesterov",
        "adaptive_rate",
        "subgradient",
        "adagrad_init_acc",
        "rmsprop",
        "rmsprop_centered_momentum",
        "adam",
        "adamw_wd",
    }
]
core = pytest.mark.parametrize("case", CORE, ids=[c.id for c in CORE])


def cases(attr=None):
    selected = [c for c in CASES if attr is None or getattr(c, attr) is not None]
    return pytest.mark.parametrize("case", selected, ids=[c.id for c in selected])


# --------------------------------------------------------------------------- runners


def run_jft(tx, params, grad_fn, steps):
    """Yields params after each step of tx, gradients from grad_fn (NumPy, float64).

    Eager on purpose: each primitive compiles once for the whole session, where a
    jitted update would compile once per case (jit is tested where it matters:
    inject_hyperparams, recompilation, convergence).
    """
    update = tx.update
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for t in range(steps):
        g = jax.tree.map(jnp.asarray, grad_fn(jax.tree.map(np.asarray, p), t))
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
        yield jax.tree.map(np.asarray, p)


def run_ref(ref, lr_fn, params, grad_fn, steps):
    leaves, treedef = jax.tree.flatten(params)
    states = [{} for _ in leaves]
    for t in range(steps):
        grads = jax.tree.leaves(grad_fn(jax.tree.unflatten(treedef, leaves), t))
        lr = lr_fn(t)
        leaves = [ref(lr, t, th, g, s) for th, g, s in zip(leaves, grads, states, strict=True)]
        yield jax.tree.unflatten(treedef, leaves)


def run_torch(case, lr, factor, params, grad_fn, steps):
    leaves, treedef = jax.tree.flatten(params)
    tensors = [torch.tensor(np.array(x), dtype=torch.float64, requires_grad=True) for x in leaves]
    opt = case.torch(tensors, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor(t) * case.torch_factor(t))
    for step in range(steps):
        current = jax.tree.unflatten(treedef, [x.detach().numpy() for x in tensors])
        for x, g in zip(tensors, jax.tree.leaves(grad_fn(current, step)), strict=True):
            x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        sched.step()
        yield jax.tree.unflatten(treedef, [x.detach().numpy().copy() for x in tensors])


def assert_trees_close(actual, expected, rtol, atol=0.0, step=None):
    """Per leaf, max |a − e| <= rtol · max |e| + atol: the error relative to the leaf's scale.

    (Elementwise relative error is ill-conditioned where a parameter crosses 0.)
    """
    for (path, a), e in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        err, scale = np.max(np.abs(a - e)), np.max(np.abs(e))
        assert err <= rtol * scale + atol, (
            f"leaf {jax.tree_util.keystr(path)} step {step}: max error {err:.3g}, "
            f"relative {err / scale:.3g} > {rtol}"
        )


# --------------------------------------------------------------------------- equivalence


# (The heavy ball's θ-form holds with a constant η only, see its docstring; its
# scheduled run is checked against torch's LambdaLR.)
# Rules with a torch twin are checked with a schedule there (LambdaLR), the others here.
FORMULA = [(c, False) for c in CASES] + [(c, True) for c in CASES if c.torch is None]


@pytest.mark.parametrize(
    ("case", "scheduled"), FORMULA, ids=[f"{c.id}-{'sched' if s else 'const'}" for c, s in FORMULA]
)
def test_equals_formula_reference(case, scheduled, x64):
    params, grad_fn = make_problem()
    steps = 25
    lr = (lambda t: case.lr * sched_factor(t)) if scheduled else case.lr
    lr_fn = lr if scheduled else (lambda t: case.lr)
    tx = case.make(lr, **case.kwargs)
    for step, (got, want) in enumerate(
        zip(
            run_jft(tx, params, grad_fn, steps),
            run_ref(case.ref, lr_fn, params, grad_fn, steps),
            strict=True,
        )
    ):
        assert_trees_close(got, want, rtol=1e-10, atol=1e-13, step=step)


@cases("torch")
@pytest.mark.parametrize("scheduled", [False, True], ids=["const", "sched"])
def test_equals_torch(case, scheduled, x64):
    params, grad_fn = make_problem(seed=1)
    steps = 120
    factor = sched_factor if scheduled else (lambda t: 1.0)
    lr = (lambda t: case.lr * sched_factor(t)) if scheduled else case.lr
    tx = case.make(lr, **case.kwargs)
    n = 0
    for step, (got, want) in enumerate(
        zip(
            run_jft(tx, params, grad_fn, steps),
            run_torch(case, case.lr, factor, params, grad_fn, steps),
            strict=True,
        )
    ):
        assert_trees_close(got, want, rtol=1e-9, atol=1e-12, step=step)
        n += 1
    assert n == steps


@cases("optax")
def test_equals_optax(case, x64):
    params, grad_fn = make_problem(seed=2)
    steps = 30
    for step, (got, want) in enumerate(
        zip(
            run_jft(case.tx(), params, grad_fn, steps),
            run_jft(case.optax(case.lr), params, grad_fn, steps),
            strict=True,
        )
    ):
        assert_trees_close(got, want, rtol=1e-10, atol=1e-13, step=step)


def test_optax_differences_are_as_documented(x64):
    """Where defaults differ from optax, the documented setting recovers optax."""
    params, grad_fn = make_problem(seed=3)
    pairs = [
        # optax.adamw's default weight decay is 1e-4 (jft/torch: 0.01).
        (optim.adamw(0.01, weight_decay=1e-4), optax.adamw(0.01)),
        # optax.rmsprop with eps_in_sqrt=False and jft's decay.
        (optim.rmsprop(0.01, decay=0.9), optax.rmsprop(0.01, 0.9, eps_in_sqrt=False)),
    ]
    for ours, theirs in pairs:
        for got, want in zip(
            run_jft(ours, params, grad_fn, 10), run_jft(theirs, params, grad_fn, 10), strict=True
        ):
            assert_trees_close(got, want, rtol=1e-10, atol=1e-13)
    # And the defaults do differ (so the notes are needed).
    for ours, theirs in [
        (optim.adamw(0.01), optax.adamw(0.01)),
        (optim.adagrad(0.1), optax.adagrad(0.1)),
        (optim.rmsprop(0.01), optax.rmsprop(0.01)),
    ]:
        got = list(run_jft(ours, params, grad_fn, 5))[-1]
        want = list(run_jft(theirs, params, grad_fn, 5))[-1]
        assert not np.allclose(got["w"], want["w"], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- complex


def _complex_problem(seed):
    """Complex128 params and gradients: two real problems as real and imaginary parts."""
    (p_re, g_re), (p_im, g_im) = make_problem(seed), make_problem(seed + 100)
    params = jax.tree.map(lambda a, b: a + 1j * b, p_re, p_im)

    def grad_fn(p, t):
        re, im = jax.tree.map(np.real, p), jax.tree.map(np.imag, p)
        return jax.tree.map(lambda a, b: a + 1j * b, g_re(re, t), g_im(im, t))

    return params, grad_fn


def _real_view(tree):
    return jax.tree.map(lambda z: np.stack([np.real(z), np.imag(z)], -1), tree)


@cases("optax")
def test_complex_equals_optax(case, x64):
    # optax's convention: the update of the conjugate gradient, second moments |g|².
    params, grad_fn = _complex_problem(seed=5)
    for step, (got, want) in enumerate(
        zip(
            run_jft(case.tx(), params, grad_fn, 20),
            run_jft(case.optax(case.lr), params, grad_fn, 20),
            strict=True,
        )
    ):
        assert_trees_close(_real_view(got), _real_view(want), rtol=1e-10, atol=1e-13, step=step)


def test_complex_second_moment_is_the_squared_modulus():
    # The case: g = 1j. g·g = −1 made Adam step along +1 (real); |g|² = 1
    # steps along −1j, as optax and torch do (RMSProp, unbiased: −lr·1j/√(1 − ρ)).
    for tx, want in [
        (optim.adam(0.1), -0.1j),
        (optim.adamw(0.1), -0.1j),
        (optim.adagrad(0.1), -0.1j),
        (optim.rmsprop(0.1), -1j),
    ]:
        p = jnp.zeros(1, jnp.complex64)
        u, _ = tx.update(jnp.array([1j], jnp.complex64), tx.init(p), p)
        np.testing.assert_allclose(np.asarray(u), [want], rtol=1e-5)
        assert u.dtype == jnp.complex64


LINEAR = {"gradient_descent", "heavy_ball", "heavy_ball_nesterov", "subgradient"}


@cases("torch")
def test_complex_against_torch_as_documented(case, x64):
    """Linear rules equal torch on complex parameters; in the others torch treats a
    complex parameter as two real ones (view_as_real): jft on the real view equals it."""
    params, grad_fn = _complex_problem(seed=6)
    leaves, treedef = jax.tree.flatten(params)
    tensors = [torch.tensor(np.array(x), requires_grad=True) for x in leaves]  # complex128
    opt = case.torch(tensors, case.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, case.torch_factor)
    if case.id in LINEAR:
        ours = run_jft(case.tx(), params, grad_fn, 30)
    else:
        as_complex = lambda p: jax.tree.map(lambda x: x[..., 0] + 1j * x[..., 1], p)
        real_grad_fn = lambda p, t: _real_view(grad_fn(as_complex(p), t))
        ours = map(as_complex, run_jft(case.tx(), _real_view(params), real_grad_fn, 30))
    for step, got in enumerate(ours):
        current = jax.tree.unflatten(treedef, [x.detach().numpy() for x in tensors])
        for x, g in zip(tensors, jax.tree.leaves(grad_fn(current, step)), strict=True):
            x.grad = torch.tensor(g)
        opt.step()
        sched.step()
        theirs = jax.tree.unflatten(treedef, [x.detach().numpy().copy() for x in tensors])
        assert_trees_close(_real_view(got), _real_view(theirs), rtol=1e-9, atol=1e-12, step=step)


# --------------------------------------------------------------------------- convergence


def _minimize(tx, loss, x0, steps):
    @jax.jit
    def run(x):
        def body(carry, _):
            x, s = carry
            g = jax.grad(loss)(x)
            u, s = tx.update(g, s, x)
            return (optax.apply_updates(x, u), s), None

        (x, _), _ = jax.lax.scan(body, (x, tx.init(x)), None, length=steps)
        return x

    return run(x0)


@cases("quad")
def test_converges_on_quadratic(case):
    lr, steps = case.quad
    x = _minimize(case.tx(lr), lambda x: jnp.sum((x - 2.0) ** 2), jnp.zeros(1), steps)
    assert abs(float(x[0]) - 2.0) < 1e-3, float(x[0])


def rosenbrock(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


@cases("rosen")
def test_converges_on_rosenbrock(case):
    lr, steps, *overrides = case.rosen
    tx = case.tx(lr, **(overrides[0] if overrides else {}))
    x = _minimize(tx, rosenbrock, jnp.array([-1.2, 1.0]), steps)
    np.testing.assert_allclose(np.asarray(x), [1.0, 1.0], atol=1e-2)


def test_subgradient_converges_on_l1():
    target = jnp.array([2.0, -1.0, 0.5, 0.0])
    loss = lambda x: jnp.sum(jnp.abs(x - target))
    x = _minimize(optim.subgradient(0.5), loss, jnp.zeros(4), 5000)
    np.testing.assert_allclose(np.asarray(x), target, atol=1e-2)
    # The constant step of plain gradient descent keeps oscillating at its size.
    y = _minimize(optim.gradient_descent(0.5 * 0.3), loss, jnp.full(4, 0.1), 5000)
    assert float(loss(y)) > float(loss(x))


def test_subgradient_at_kinks_is_as_documented():
    assert float(jax.grad(jnp.abs)(0.0)) == 1.0
    assert float(jax.grad(jax.nn.relu)(0.0)) == 0.0
    assert float(jax.grad(lambda x: jnp.maximum(x, 0.0))(0.0)) == 0.5
    assert float(jax.grad(lambda x: jnp.maximum(0.0, 1.0 - x))(1.0)) == -0.5


# --------------------------------------------------------------------------- adaptive_rate guard


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_adaptive_rate_stays_finite_when_beta_g_reaches_minus_one(dtype):
    beta = 0.5
    g = jnp.array([-2.0, -2.0 - 1e-6, -2.0 + 1e-6, -1.999, -4.0, -3.0, 2.0, 1e4, -1e4], dtype)
    tx = optim.adaptive_rate(0.1, beta)
    updates, _ = jax.jit(tx.update)(g, tx.init(g))
    assert updates.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(updates))), updates
    # Away from the guard the formula holds, also past the pole (βg < −1).
    i = np.array([4, 5, 6, 7, 8])
    g64 = np.asarray(g, np.float64)[i]
    np.testing.assert_allclose(
        np.asarray(updates, np.float64)[i], -0.1 * g64 / (1 + beta * g64), rtol=1e-2
    )
    # Exactly at βg = −1 the denominator is +eps (then clipped to the dtype's range).
    want = 0.1 * min(2.0 / 1e-6, float(jnp.finfo(dtype).max))
    np.testing.assert_allclose(float(updates[0]), want, rtol=1e-2)


def test_adaptive_rate_differentiable_point_no_nan_under_grad():
    # A training step whose gradient lands exactly on the pole.
    tx = optim.adaptive_rate(1.0, beta=1.0)
    p = jnp.zeros(3)
    updates, _ = tx.update(jnp.array([-1.0, -1.0, 0.5]), tx.init(p))
    assert bool(jnp.all(jnp.isfinite(updates)))


# --------------------------------------------------------------------------- composition


def _tree(dtype=jnp.float32):
    params, grad_fn = make_problem(seed=4)
    p = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    g = jax.tree.map(lambda x: jnp.asarray(x, dtype), grad_fn(params, 0))
    return p, g


@core
def test_works_in_chain(case):
    p, g = _tree()
    tx = optax.chain(optax.clip_by_global_norm(1.0), case.tx())
    alone = case.tx()
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    p2, s, s2 = p, tx.init(p), alone.init(p)
    for _ in range(3):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        u2, s2 = alone.update(clipped, s2, p2)  # same as clipping by hand
        p2 = optax.apply_updates(p2, u2)
    assert_trees_close(p, p2, rtol=1e-6, atol=1e-7)


@core
def test_works_in_partition(case):
    p, g = _tree()
    labels = {"w": "train", "b": "train", "conv": {"k": "frozen"}, "s": "train"}
    tx = optax.partition({"train": case.tx(), "frozen": optax.set_to_zero()}, labels)
    u, _ = tx.update(g, tx.init(p), p)
    assert not np.any(np.asarray(u["conv"]["k"]))
    u_alone, _ = case.tx().update(g["w"], case.tx().init(p["w"]), p["w"])
    np.testing.assert_allclose(u["w"], u_alone, rtol=1e-6)


@core
def test_inject_hyperparams(case):
    p, g = _tree()
    tx = optax.inject_hyperparams(case.make)(lr=case.lr, **case.kwargs)
    state = tx.init(p)
    update = jax.jit(tx.update)
    u1, _ = update(g, state, p)
    # Same numbers as the plain factory, even with every hyperparameter traced.
    u0, _ = case.tx().update(g, case.tx().init(p), p)
    assert_trees_close(u1, u0, rtol=1e-6, atol=1e-7)
    state.hyperparams["lr"] = jnp.asarray(3 * case.lr)
    u3, _ = update(g, state, p)
    assert_trees_close(u3, jax.tree.map(lambda x: 3 * x, u1), rtol=1e-5, atol=1e-7)


@core
@pytest.mark.parametrize("scheduled", [False, True], ids=["const", "sched"])
def test_keeps_bf16(case, scheduled):
    p, g = _tree(jnp.bfloat16)
    lr = optax.linear_schedule(case.lr, 0.0, 100) if scheduled else case.lr
    tx = case.make(lr, **case.kwargs)
    state = tx.init(p)
    for _ in range(2):
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    for x in jax.tree.leaves((u, p)):
        assert x.dtype == jnp.bfloat16
    shapes = {x.shape for x in jax.tree.leaves(p)}
    mirrored = [x for x in jax.tree.leaves(state) if x.shape in shapes and x.ndim > 0]
    for x in mirrored:
        assert x.dtype == jnp.bfloat16, jax.tree.map(lambda x: x.dtype, state)
    if case.make not in (optim.gradient_descent, optim.adaptive_rate, optim.subgradient):
        assert mirrored  # the check above had something to check
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


@core
def test_does_not_recompile(case):
    p, g = _tree()
    tx = case.tx()
    update = jax.jit(tx.update)
    state = tx.init(p)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    u, state = update(jax.tree.map(lambda x: 0.5 * x, g), state, p)
    assert update._cache_size() == 1


# --------------------------------------------------------------------------- hyperparameters


BAD = [
    (optim.gradient_descent, (-0.1,), {}, "lr"),
    (optim.gradient_descent, (float("nan"),), {}, "lr"),
    (optim.momentum, (0.1,), {"beta": 1.0}, "beta"),
    (optim.momentum, (0.1,), {"beta": -0.1}, "beta"),
    (optim.heavy_ball, (0.1,), {"momentum": 1.5}, "momentum"),
    (optim.heavy_ball, (-1.0,), {}, "lr"),
    (optim.adaptive_rate, (0.1,), {"beta": float("nan")}, "beta"),
    (optim.adaptive_rate, (0.1,), {"beta": -1.0}, "beta"),
    (optim.subgradient, (np.float32(-1.0),), {}, "lr"),
    (optim.adagrad, (0.1,), {"eps": -1e-3}, "eps"),
    (optim.adagrad, (0.1,), {"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
    (optim.rmsprop, (0.1,), {"decay": 1.0}, "decay"),
    (optim.rmsprop, (0.1,), {"decay": float("nan")}, "decay"),
    (optim.rmsprop, (0.1,), {"momentum": -0.5}, "momentum"),
    (optim.adam, (float("nan"),), {}, "lr"),
    (optim.adam, (0.1,), {"b1": 1.0}, "b1"),
    (optim.adam, (0.1,), {"b2": -0.001}, "b2"),
    (optim.adamw, (0.1,), {"b2": 1.2}, "b2"),
    (optim.adamw, (0.1,), {"weight_decay": -0.01}, "weight_decay"),
    (optim.adamw, (0.1,), {"weight_decay": float("inf")}, "weight_decay"),
    (optim.adagrad, (0.1,), {"eps": float("inf")}, "eps"),
    (optim.adaptive_rate, (0.1,), {"beta": float("inf")}, "beta"),
]


@pytest.mark.parametrize(
    ("factory", "args", "kwargs", "name"),
    BAD,
    ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, _, n) in enumerate(BAD)],
)
def test_bad_hyperparameters_raise(factory, args, kwargs, name):
    with pytest.raises(optim.HyperparameterError, match=rf"\b{name}\b") as err:
        factory(*args, **kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, jft.errors.JftError)


def test_good_and_traced_hyperparameters_pass():
    optim.adam(optax.constant_schedule(-1.0))  # a schedule is not checked
    optim.adam(jnp.asarray(1e-3), b1=jnp.asarray(0.9))  # nor an array
    optim.adam(0.0, b1=0.0, b2=0.0, eps=0.0)
    optim.adaptive_rate(0.1, beta=3.0)  # beta is not an average here


def test_public_api():
    assert jft.optim is optim
    # sgd is gradient_descent under its other name: the tables above test it once.
    assert optim.sgd is optim.gradient_descent
    for name in optim.__all__:
        assert getattr(optim, name).__doc__, name


# --------------------------------------------------------------------------- finite, floating

FACTORIES = [
    optim.gradient_descent,
    optim.momentum,
    optim.heavy_ball,
    optim.adaptive_rate,
    optim.subgradient,
    optim.adagrad,
    optim.rmsprop,
    optim.adam,
    optim.adamw,
]
FACTORY_ARGS = {optim.adaptive_rate: {"beta": 0.1}}


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), np.float32("inf")], ids=str)
@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_infinite_learning_rate_raises(factory, bad):
    with pytest.raises(optim.HyperparameterError, match=r"\blr\b.*finite") as err:
        factory(bad, **FACTORY_ARGS.get(factory, {}))
    assert isinstance(err.value, jft.errors.JftError) and isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)
    # optax.inject_hyperparams hands the factory a concrete jax.Array at init: checked too.
    tx = optax.inject_hyperparams(factory)(bad, **FACTORY_ARGS.get(factory, {}))
    with pytest.raises(optim.HyperparameterError, match=r"\blr\b"):
        tx.init(jnp.zeros(2))


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_integer_parameters_raise(factory):
    params = {"b": jnp.zeros(2), "w": jnp.ones(2, jnp.int32)}
    name = factory.__name__
    want = rf"^jft\.optim\.{name}: parameter 'w' has dtype int32; .*floating-point"
    for tx in (
        factory(0.1, **FACTORY_ARGS.get(factory, {})),
        optax.inject_hyperparams(factory)(0.1, **FACTORY_ARGS.get(factory, {})),
    ):
        with pytest.raises(optim.ParameterDtypeError, match=want) as err:
            jax.jit(tx.init)(params)
        assert isinstance(err.value, TypeError) and isinstance(err.value, jft.errors.JftError)


# --------------------------------------------------------------------------- lr in train metrics


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="head")(nn.Dense(4, name="backbone")(x))


def _lr_metrics(rules, steps=2):
    model = _Tiny()
    x = np.linspace(-1, 1, 8 * 5, dtype=np.float32).reshape(8, 5)
    batch = {"image": x, "label": np.arange(8, dtype=np.int32) % 3}
    state = jft.train.create_train_state(model.init(jax.random.key(0), x), rules)
    step = jft.train.make_train_step(model, rules, jft.train.losses.get("softmax_xent"))
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        out.append({k: round(float(v), 6) for k, v in metrics.items() if k.startswith("lr")})
    return out


def test_learning_rate_reported_in_every_documented_form():
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    # plain jft rule with a schedule: the rate of each step
    assert _lr_metrics([(".*", optim.adam(schedule))]) == [{"lr": 1.0}, {"lr": 0.9}]
    # optax.inject_hyperparams(jft rule)(lr=...): its `lr` hyperparameter, once
    assert (
        _lr_metrics([(".*", optax.inject_hyperparams(optim.adam)(lr=0.25))]) == [{"lr": 0.25}] * 2
    )
    # chained with clipping
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optim.heavy_ball(0.5))
    assert _lr_metrics([(".*", clipped)], steps=1) == [{"lr": 0.5}]
    # partition rules, one per rule, named by its index; frozen parts have none
    injected = optax.inject_hyperparams(optim.rmsprop)(lr=schedule)
    rules = [
        ("head/.*", optim.sgd(0.125)),
        ("backbone/kernel", optax.chain(optax.clip_by_global_norm(1.0), injected)),
        (".*", None),
    ]
    got = _lr_metrics(rules)
    assert got == [{"lr/0": 0.125, "lr/1": 1.0}, {"lr/0": 0.125, "lr/1": 0.9}]
