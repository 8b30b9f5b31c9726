r"""Every update rule on L(θ) = (θ − 2)², from θ = −3: one plot of the trajectories, one table.

Run (seconds):

    jft train --config configs/quadratic.py --workdir runs/quadratic

It writes ``runs/quadratic/plots/quadratic.png`` and prints the final θ of each
rule. Result: every rule ends within 0.01 of θ* = 2 after 200 steps, except
AdamW, whose decoupled weight decay settles 0.03 below 2 (by design), and
SGD, whose minibatch noise keeps it jittering around 2.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The quadratic study; ``arg`` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    # The entry point that runs this study (its keys are its own, not a training run's).
    c.program = "jft.train.quadratic:run_quadratic"
    c.seed = 0
    c.theta0 = -3.0
    c.target = 2.0
    c.num_steps = 200
    # Optimizer: each jft.optim optimizer by name, with its arguments (sgd sees a noisy
    # minibatch gradient). Not partition rules: this study has no model to partition.
    c.optimizers = ml_collections.ConfigDict(
        {
            "gradient_descent": {"lr": 0.1},
            "sgd": {"lr": 0.05, "noise": 0.5},
            "momentum": {"lr": 0.1, "beta": 0.9},
            "heavy_ball": {"lr": 0.05, "momentum": 0.5},
            "adaptive_rate": {"lr": 0.1, "beta": 0.01},
            "subgradient": {"lr": 0.2},
            "adagrad": {"lr": 2.0},
            "rmsprop": {"lr": 0.05},
            "adam": {"lr": 0.1},
            "adamw": {"lr": 0.1, "weight_decay": 0.01},
        }
    )
    return c
