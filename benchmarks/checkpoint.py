"""Checkpoint cost: training throughput with a checkpoint every 50 steps vs none; save/restore time.

    python benchmarks/checkpoint.py [--steps 600] [--repeats 3] [--sizes 1,16,64,256]

1. Throughput: ``jft.train.train_and_evaluate`` on the offline digits data (a CNN,
   no eval) with ``config.checkpoint.every = 50`` against ``every = 0`` (only the
   final save, which both runs make), in one process, alternating, each run in a
   fresh workdir; at 8×8 (a ~12 ms step: a save every 0.6 s) and resized to 32×32
   (a ~80 ms step, closer to a real fine-tuning step). A persistent compilation
   cache, filled by an untimed warm-up run of each, keeps XLA compile time out of
   the timed runs. Target: ratio ≥ 0.95.
2. Save and restore time against the checkpoint's size: a :class:`TrainState` of
   float32 parameters with Adam (state = 3× the parameters), on one device.
   "blocking" is what ``save`` costs the training loop (the device-to-host copy,
   the checksums, starting the write); "total" includes the background write
   (``wait``); "restore" reads it back and verifies the checksums.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np


def _config(steps: int, every: int, image_size: int = 8):
    from jft.train import default_config

    c = default_config()
    c.data.name = "digits"
    c.data.batch_size = 64
    if image_size != 8:
        c.data.preprocess = f"resize({image_size})"
    c.model = {"name": "cnn", "widths": (32, 64, 128), "num_classes": 10}
    c.num_steps = steps
    c.eval_every = 0
    c.log_every = 50
    c.progress = False
    c.checkpoint.every = every
    c.checkpoint.best_metric = ""
    return c


def throughput(steps: int, repeats: int, root: str, image_size: int) -> None:
    from jft.train import train_and_evaluate

    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    modes = {"none": 0, "every 50": 50}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats + 1):  # rep 0: warm-up, untimed
        for name, every in modes.items():
            workdir = os.path.join(root, f"{name.replace(' ', '')}-{image_size}-{rep}")
            with contextlib.redirect_stdout(io.StringIO()):  # the runs' own summaries
                result = train_and_evaluate(_config(steps, every, image_size), workdir)
            if rep:
                rates[name].append(result["steps_per_sec"])
            saved = sorted(
                int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()
            )
            shutil.rmtree(workdir)
    base = statistics.median(rates["none"])
    print(
        f"\nThroughput, {steps} steps, CNN on digits at {image_size}x{image_size} "
        f"({base:.0f} steps/s: a save every {50 / base:.1f} s), "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores), median of {repeats}"
    )
    header = f"{'checkpoints':>12} | {'steps/s':>8} | {'runs':>24} | ratio"
    print(header)
    print("-" * len(header))
    for name in modes:
        med = statistics.median(rates[name])
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"{name:>12} | {med:8.1f} | {runs:>24} | {med / base:.3f}")
    print(f"(last run kept steps {saved}; target ratio >= 0.95)")


def _state(n_bytes: int):
    from jft.optim import adam
    from jft.train import create_train_state

    # Four layers of equal size; parameters are a third of the checkpoint (Adam: mu, nu).
    n = max(n_bytes // 4 // 3 // 4, 1)
    side = int(np.sqrt(n))
    params = {
        f"layer{i}": {"kernel": jnp.full((side, side), 0.01 * i, jnp.float32)} for i in range(4)
    }
    return create_train_state({"params": params}, [(".*", adam(1e-3))])


def save_restore(sizes_mb: list[int], repeats: int) -> None:
    from jft.train import Checkpointer

    print(
        "\nSave / restore time against size (one device; median of "
        f"{repeats}; sizes are parameters + Adam state)"
    )
    header = (
        f"{'size MB':>8} | {'blocking s':>10} | {'total s':>8} | {'write MB/s':>10} | "
        f"{'restore s':>9} | {'read MB/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for mb in sizes_mb:
        state = _state(mb * 2**20)
        size = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
        blocking, total, restore = [], [], []
        for rep in range(repeats + 1):  # rep 0: warm-up (compiles the checksums)
            root = tempfile.mkdtemp(prefix="jft-bench-ckpt-")
            try:
                ck = Checkpointer(root, every=1)
                t0 = time.perf_counter()
                ck.save(1, state, data_state={}, config={})
                t1 = time.perf_counter()
                ck.wait()
                t2 = time.perf_counter()
                ck.close()
                ck = Checkpointer(root, every=1)
                t3 = time.perf_counter()
                r = ck.restore(state)
                jax.block_until_ready(r.state)
                t4 = time.perf_counter()
                ck.close()
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if rep:
                blocking.append(t1 - t0)
                total.append(t2 - t0)
                restore.append(t4 - t3)
        b, t, r = (statistics.median(v) for v in (blocking, total, restore))
        print(f"{size:8.1f} | {b:10.3f} | {t:8.3f} | {size / t:10.0f} | {r:9.3f} | {size / r:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps of the 8x8 runs")
    parser.add_argument("--steps-32", type=int, default=250, help="steps of the 32x32 runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1,16,64,256", help="checkpoint sizes in MB")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="jft-bench-ckpt-")  # also holds the compilation cache
    try:
        if not args.skip_throughput:
            # The digits as they are (a tiny, fast step) and resized to 32x32 (a step
            # closer to a real fine-tuning step): the cost of a save is fixed, so its
            # share depends on the time between saves.
            throughput(args.steps, args.repeats, root, 8)
            throughput(args.steps_32, args.repeats, root, 32)
        save_restore([int(s) for s in args.sizes.split(",")], args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
