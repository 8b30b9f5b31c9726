"""Does the input pipeline keep up with training? Loader vs train-step throughput on CPU.

Two workloads, each measured both ways in one run:

* ``digits``: `jft.data.get` on the offline digits (8x8x1, batch 64, shuffled,
  ``keep_classes=(5..9)``, from the tfds array_record files through grain; the split
  is small, so it is held in memory: ``cache="auto"``; a second row reads every record
  from array_record and decodes it, ``cache=False``), against the default
  recipe's train step: ``jft.models.get("cnn", num_classes=5)``, Adam, batch 64.
* ``jpeg 224``: `jft.data.get` on an ``image_folder`` of synthetic 256x256 JPEGs
  (written with PIL into a temporary dir) with ``resize(224)|normalize(...)|flip_lr``
  (JPEG decoding included: the folder keeps encoded files), batch 32, against a
  ResNet-18 train step on 224x224x3, Adam, batch 32.

The loader uses ``num_workers`` prefetch threads (``--workers``, default 2). Each
rate is the best of a few timed runs (the machine may be shared). It prints a
side-by-side table of examples/s and the ratio loader / step; the target is >= 5x.

    python benchmarks/input.py            # about 2-4 minutes on 2 CPU cores
    python benchmarks/input.py --quick    # a fast check that it runs
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _rate(fn, examples: int, repeats: int) -> float:
    """Best examples/s of ``repeats`` calls of ``fn`` (each processes ``examples``)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return examples / best


def loader_rate(cfg: dict, batches: int, repeats: int) -> float:
    """Examples/s that `jft.data.get` delivers (after its first batch)."""
    import jft

    pipe = jft.data.get(cfg, "train", train=True, seed=0, process_index=0, process_count=1)
    next(pipe)  # opens files, fills the in-memory cache, starts the threads

    def run():
        for _ in range(batches):
            next(pipe)

    rate = _rate(run, batches * pipe.batch_size, repeats)
    pipe.close()
    return rate


def step_rate(model_name: str, shape: tuple, num_classes: int, steps: int, repeats: int) -> float:
    """Examples/s that a jitted Adam train step consumes on batches of ``shape``."""
    import jax
    import jax.numpy as jnp

    import jft

    model = jft.models.get(model_name, num_classes=num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape[1:])), train=False)
    rules = [(".*", jft.optim.adam(1e-3))]
    state = jft.train.create_train_state(variables, rules)
    step = jft.train.make_train_step(model, rules, jft.train.losses.get("softmax_xent"))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=shape).astype(np.float32)),
        "label": jnp.asarray(rng.integers(0, num_classes, shape[0]).astype(np.int32)),
    }
    holder = {"state": step(state, batch)[0]}  # compile
    jax.block_until_ready(holder["state"])

    def run():
        s = holder["state"]
        for _ in range(steps):
            s, metrics = step(s, batch)
        jax.block_until_ready((s, metrics))
        holder["state"] = s

    return _rate(run, steps * shape[0], repeats)


def write_jpegs(root: str, n: int, size: int = 256) -> None:
    """``n`` smooth random RGB JPEGs in two class folders."""
    import PIL.Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % 2}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = PIL.Image.fromarray(small).resize((size, size), PIL.Image.BICUBIC)
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations, to check it runs")
    parser.add_argument("--workers", type=int, default=2, help="loader prefetch threads")
    args = parser.parse_args()
    import tensorflow_datasets as tfds
    from absl import logging

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.ERROR)
    q = args.quick
    repeats = 1 if q else 3

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ddir = os.path.join(tmp, "tfds")
        digits = {
            "name": "digits",
            "data_dir": ddir,
            "batch_size": 64,
            "keep_classes": (5, 6, 7, 8, 9),
            "num_workers": args.workers,
            "prefetch": 4,
        }
        load = loader_rate(digits, 50 if q else 500, repeats)
        uncached = loader_rate({**digits, "cache": False}, 10 if q else 100, repeats)
        step = step_rate("cnn", (64, 8, 8, 1), 5, 10 if q else 200, repeats)
        rows.append(("digits 8x8x1, batch 64", "cnn (5 classes)", load, step))
        rows.append(("  same, cache=False (reads)", "cnn (5 classes)", uncached, step))

        folder = os.path.join(tmp, "jpegs")
        write_jpegs(folder, 64 if q else 512)
        jpeg = {
            "name": "image_folder",
            "path": folder,
            "data_dir": ddir,
            "batch_size": 32,
            "preprocess": f"resize(224)|normalize({MEAN}, {STD})|flip_lr",
            "num_workers": args.workers,
            "prefetch": 2,
        }
        load = loader_rate(jpeg, 3 if q else 15, repeats)
        step = step_rate("resnet18", (32, 224, 224, 3), 2, 1, repeats)
        rows.append(("JPEG 256->224x224x3, batch 32", "resnet18 (224x224)", load, step))

    cpus = os.cpu_count()
    print(
        f"\nInput pipeline vs train step, examples/s on this CPU ({cpus} cores), "
        f"loader with {args.workers} threads; target: loader >= 5x the step\n"
    )
    head = f"{'data':<33} {'loader ex/s':>12} | {'train step':<20} {'step ex/s':>10} | {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for data, model, load, step in rows:
        ok = "ok" if load >= 5 * step else "BELOW 5x"
        print(f"{data:<33} {load:>12,.0f} | {model:<20} {step:>10,.1f} | {load / step:>6.1f}x {ok}")


if __name__ == "__main__":
    main()
