r"""The same MLP on the digits trained with every update rule, compared in one plot and table.

One stage per rule, each a full run in ``workdir/<rule>`` with the same data,
model, seed and step budget; each rule has a learning rate suited to it.

Run (about 25 seconds on 2 CPU cores):

    jft train --config configs/optimizer_zoo.py --workdir runs/zoo

It prints each rule's test accuracy and loss and writes
``runs/zoo/plots/stages.png`` (train loss and eval accuracy of every rule).
Result (seed 0, 300 steps, test accuracy): AdaGrad 0.961, heavy ball 0.950,
RMSProp 0.942, gradient descent / SGD / adaptive rate 0.928, Adam / AdamW 0.919,
EMA momentum 0.911, subgradient 0.903. (At these learning rates and 300 steps
the ranking says more about the rates than the rules.)
"""

import ml_collections

from jft.train import default_config

RULES = {
    "gradient_descent": {"lr": 0.1},
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.1, "beta": 0.9},
    "heavy_ball": {"lr": 0.05, "momentum": 0.9},
    "adaptive_rate": {"lr": 0.1, "beta": 0.1},
    "subgradient": {"lr": 0.5},
    "adagrad": {"lr": 0.05},
    "rmsprop": {"lr": 1e-3},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """One stage per rule; ``arg``: a comma-separated subset of rules (default all)."""
    names = tuple(arg.split(",")) if arg else tuple(RULES)
    c = ml_collections.ConfigDict()
    c.stages = names
    for name in names:
        s = default_config()
        s.description = f"{name} {RULES[name]}"
        # Data
        s.data.name = "digits"
        s.data.batch_size = 64
        # Model
        s.model = ml_collections.ConfigDict({"name": "mlp", "widths": (128,), "num_classes": 10})
        # Optimizer
        s.optimizer = ml_collections.ConfigDict({"name": name, **RULES[name]})
        s.num_steps = 300
        s.log_every = 10
        s.eval_every = 100
        # Checkpoints
        s.checkpoint.every = 300
        c[name] = s
    return c
