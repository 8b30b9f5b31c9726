"""What LoRA costs: full fine-tuning vs head-only vs LoRA r=8 vs DoRA r=8, side by side.

For MiniLM-L6 (sequence length 128) and a ViT-B/16-sized model (224×224), both
with random weights (timing does not depend on them), each train step runs in
its own subprocess, so its peak RSS is its own:

* ``full``: every parameter trains with Adam (``jft.train.make_train_step``).
* ``head``: only ``head/`` trains; the rest is a frozen ``jft.partition``.
* ``lora``: LoRA r=8, alpha=16 on every layer's attention query and value
  (PEFT's default targets for BERT and ViT) plus the head; the base is frozen
  (``jft.peft.adapter_rules``): no optimizer state, no kernel gradient.
* ``dora``: the same with DoRA.

It prints trainable parameters, optimizer-state bytes, the FLOPs of the
compiled step (XLA's cost analysis), the fastest step time of a few, and the
peak RSS, each also as a ratio to full fine-tuning, and checks the targets:
LoRA's optimizer state ≤ 2 % of full, its step ≤ 0.75× full, its peak memory
below full.

    python benchmarks/lora.py            # the numbers
    python benchmarks/lora.py --quick    # a fast check that it runs (tiny batches)
    JAX_PLATFORMS=cuda python benchmarks/lora.py   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _harness import mib as _mib
from _harness import (
    run_result,
    run_rows,
    subprocess_env,
    time_interleaved,
    time_step,
    worker_main,
)

MODELS = ("minilm", "vit_b16")
VARIANTS = ("full", "head", "lora", "dora")
LABELS = {"full": "full fine-tuning", "head": "head-only", "lora": "LoRA r=8", "dora": "DoRA r=8"}
TARGETS = r"backbone/encoder/layer_\d+/attention/(query|value)"


def _setup(name: str, quick: bool):
    """(model, variables, batch) for one benchmark model, random weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jft.models

    rng = np.random.default_rng(0)
    key = jax.random.key(0, impl="rbg")  # threefry's random init compiles slowly on CPU
    if name == "minilm":
        batch_size = 2 if quick else 8
        model = jft.models.get("minilm_l6", num_classes=2)
        ids = jnp.asarray(rng.integers(1000, 30000, (batch_size, 128)), jnp.int32)
        batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
        example = (ids,)
    else:
        batch_size = 1 if quick else 4
        model = jft.models.get("vit_b16", num_classes=10)
        images = rng.normal(size=(batch_size, 224, 224, 3))
        batch = {"image": jnp.asarray(images, jnp.float32)}
        example = (batch["image"],)
    batch["label"] = jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32)
    variables = jax.jit(model.init)(key, *example)
    return model, variables, batch, example


def _build(name: str, variant: str, quick: bool):
    """(train step, state, batch) of one (model, variant), not yet compiled."""
    import optax

    import jft.optim
    import jft.peft
    from jft import train

    model, variables, batch, example = _setup(name, quick)

    def loss_fn(logits, b):
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

    adam = jft.optim.adam(1e-4)
    if variant == "full":
        rules = [(".*", adam)]
    elif variant == "head":
        rules = [("head/.*", adam), (".*", None)]
    else:
        config = jft.peft.LoraConfig(targets=(TARGETS,), rank=8, alpha=16, variant=variant)
        model = jft.peft.lora(model, config)
        variables = jft.peft.init_adapters(model, variables, *example)
        rules = jft.peft.adapter_rules(adam, also=["head/.*"])
    state = train.create_train_state(variables, rules)
    return train.make_train_step(model, rules, loss_fn), state, batch


def worker(name: str, variant: str, steps: int, quick: bool) -> dict:
    """One (model, variant) alone in its process: its sizes, FLOPs and peak RSS."""
    import jax

    step, state, batch = _build(name, variant, quick)
    state, metrics, timing = time_step(step, state, batch, steps)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    return {
        "model": name,
        "variant": variant,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        **timing,
        "trainable": size(state.trainable),
        "params": size(state.trainable) + size(state.frozen),
        "opt_state_bytes": nbytes(state.opt_state),
        "loss": float(metrics["loss"]),
    }


def timing_worker(name: str, rounds: int, quick: bool) -> dict:
    """Every variant of one model compiled in one process and timed in turn, round by round."""
    steps = {}
    for variant in VARIANTS:
        step, state, batch = _build(name, variant, quick)
        steps[variant] = (step.lower(state, batch).compile(), state, batch)
    return time_interleaved(steps, rounds)


def _table(rows: dict[tuple[str, str], dict], timings: dict[str, dict]) -> str:
    lines = []
    header = (
        f"{'variant':<17} {'trainable':>11} {'opt state':>20} {'GFLOP':>13} "
        f"{'step (ratio, quartiles)':>28} {'peak RSS':>20}"
    )
    for name in MODELS:
        if (name, "full") not in rows:
            continue
        full = rows[(name, "full")]
        batch = ", ".join(f"{k} {'×'.join(map(str, s))}" for k, s in full["batch"].items())
        lines += [f"{name} (random weights; {batch})", header, "-" * len(header)]
        for variant in VARIANTS:
            r = rows.get((name, variant))
            if r is None:
                continue
            ratio = lambda key, r=r, full=full: r[key] / full[key]
            t = timings[name][variant]
            lines.append(
                f"{LABELS[variant]:<17} {r['trainable']:>11,} "
                f"{_mib(r['opt_state_bytes']):>12} {ratio('opt_state_bytes'):>6.1%} "
                f"{r['flops'] / 1e9:>7.1f} {ratio('flops'):>4.2f}× "
                f"{t['step_s'] * 1e3:>7.0f}ms {t['ratio']:>4.2f}× "
                f"({t['ratio_lo']:.2f}-{t['ratio_hi']:.2f}) "
                f"{_mib(r['peak_rss_bytes']):>12} {ratio('peak_rss_bytes'):>5.2f}×"
            )
        for variant in ("lora", "dora"):
            r = rows.get((name, variant))
            if r is None:
                continue
            checks = [
                ("opt state ≤ 2%", r["opt_state_bytes"] <= 0.02 * full["opt_state_bytes"]),
                ("step ≤ 0.75×", timings[name][variant]["ratio"] <= 0.75),
                ("peak RSS < full", r["peak_rss_bytes"] < full["peak_rss_bytes"]),
            ]
            said = ", ".join(f"{what}: {'met' if ok else 'MISSED'}" for what, ok in checks)
            lines.append(f"  {LABELS[variant]} targets: {said}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Runs every (model, variant) in its own subprocess, then each model's timing; prints."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, 3 timed rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--timing", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    if worker_main(args, worker, args.steps):
        return
    if args.timing:
        print("RESULT " + json.dumps(timing_worker(args.timing, rounds, args.quick)), flush=True)
        return

    env = subprocess_env(force_cpu=False)
    models = args.models.split(",")
    rows = run_rows(__file__, models, VARIANTS, 1, args.quick, env)
    timings = {}
    for name in models:
        cmd = [sys.executable, os.path.abspath(__file__), "--timing", name]
        cmd += ["--rounds", str(rounds)] + (["--quick"] if args.quick else [])
        timings[name] = run_result(cmd, env, f"{name} timing")
        said = ", ".join(f"{v} {t['step_s'] * 1e3:.0f} ms" for v, t in timings[name].items())
        print(f"  {name} timing, median of {rounds} rounds: {said}", file=sys.stderr, flush=True)
    print(
        f"\nLoRA train-step cost, {env['JAX_PLATFORMS']} ({os.cpu_count()} cores). Sizes, "
        "GFLOP (XLA's cost analysis) and peak RSS: each variant alone in its process. "
        f"Step: the four compiled in one process and run in turn for {rounds} rounds; the "
        "median step, and the median (and quartiles) of its per-round ratio to full "
        "fine-tuning. Every other ratio is to full fine-tuning\n"
    )
    print(_table(rows, timings))


if __name__ == "__main__":
    main()
