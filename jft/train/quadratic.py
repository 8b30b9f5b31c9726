"""Every update rule on the quadratic ``L(θ) = (θ − target)²``: trajectories, a plot, a table.

The ``quadratic`` recipe (``configs/quadratic.py``) names :func:`run_quadratic`
as its entry point (``program = "jft.train.quadratic:run_quadratic"``), which
:func:`jft.train.train_and_evaluate` calls.
Each rule starts from ``theta0`` and takes ``num_steps`` steps with its own
hyperparameters; ``sgd`` sees a minibatch gradient (the mean of ``(θ − x_i)²``
over ``x_i ~ N(target, noise²)``, seeded), ``subgradient`` the same gradient as
the others. The plot shows θ against the step for every rule, the table the
final θ and its distance to the target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jft import optim
from jft.train.logging import format_table

__all__ = ["run_quadratic", "trajectory"]


def trajectory(
    tx: optax.GradientTransformation,
    *,
    theta0: float,
    target: float,
    num_steps: int,
    noise: float = 0.0,
    batch: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """θ_0 .. θ_num_steps of ``tx`` on ``(θ − target)²`` (a minibatch mean when ``noise``)."""

    def loss(theta, xs):
        return jnp.mean((theta - xs) ** 2)

    def step(carry, key):
        theta, state = carry
        xs = target + noise * jax.random.normal(key, (batch,))
        g = jax.grad(loss)(theta, xs)
        updates, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), theta

    theta = jnp.asarray(theta0, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_steps)
    _, thetas = jax.jit(lambda t: jax.lax.scan(step, (t, tx.init(t)), keys))(theta)
    return np.concatenate([[theta0], np.asarray(thetas)])


def run_quadratic(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every optimizer of ``config.optimizers`` (``jft.optim`` name -> kwargs); writes the
    plot and a JSON summary.

    Returns:
      ``{rule: {"theta": final θ, "error": |θ − target|}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    results, curves = {}, {}
    optimizers: Mapping[str, Any] = config.optimizers
    for name, kwargs in optimizers.items():
        kwargs = dict(kwargs)
        noise = kwargs.pop("noise", 0.0)
        tx = getattr(optim, name)(**kwargs)
        thetas = trajectory(
            tx,
            theta0=config.theta0,
            target=config.target,
            num_steps=config.num_steps,
            noise=noise,
            seed=config.seed,
        )
        curves[name] = thetas
        results[name] = {
            "theta": float(thetas[-1]),
            "error": float(abs(thetas[-1] - config.target)),
        }

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, thetas in curves.items():
        ax.plot(np.arange(len(thetas)), thetas, lw=1.8, label=name)
    ax.axhline(config.target, color="k", ls="--", lw=1, label=f"θ* = {config.target:g}")
    ax.set(xlabel="step", ylabel="θ", title=f"Every update rule on (θ − {config.target:g})²")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "plots", "quadratic.png"), dpi=110)
    plt.close(fig)

    if jax.process_index() == 0:
        rows = [[n, r["theta"], r["error"]] for n, r in results.items()]
        print(format_table(rows, ["rule", "final θ", "|θ − θ*|"]), flush=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
