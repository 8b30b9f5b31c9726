"""The checks that need an accelerator, in one run: kernels, layouts, speed.

Run it where a GPU or TPU is (``pip install -U "jax[cuda12]"`` or ``"jax[tpu]"``
first)::

    python benchmarks/accelerator.py            # ResNet-50, ViT-B/16, BERT-base, bf16
    python benchmarks/accelerator.py --quick    # tiny models: checks the script itself (any CPU)

It prints three tables:

1. **Kernels.** For the ResNet train step compiled for this backend: how many
   convolutions, reduce-windows (max pooling), select-and-scatters (its
   gradient), optimization barriers and custom calls (cuDNN/cuBLAS on a GPU)
   the optimized program holds, next to the same step with jft's CPU kernels
   switched off. Off the CPU the two columns must be equal: jft adds CPU
   formulations only when lowering for the CPU (``jft.ops``).
2. **Layouts.** The small CNN (BatchNorm, max pooling) trained for 10 SGD steps
   with ``parallel="none"``, ``"jit"`` over every device and ``"pmap"``; the
   largest difference to one device, relative to each array's scale. SGD keeps
   rounding differences at rounding size (tests/test_multiprocess.py derives
   1e-5 as the bound); on one device the jit and pmap rows run on that one.
3. **Speed.** Step time of a whole train step (forward, backward, AdamW update,
   metrics) with bf16 compute and float32 parameters, the step's FLOPs as XLA
   counts them (``compiled.cost_analysis()``), achieved FLOP/s, and the fraction
   of the chip's peak bf16 FLOP/s (a table of known chips; ``--peak`` to give
   it). Models: ResNet-50 at 224×224 (batch 128), ViT-B/16 at 224×224 (batch
   128), BERT-base at sequence length 128 (batch 64), all on every local device
   with the batch sharded (``parallel="jit"``).

A figure is the median of ``--rounds`` blocks of ``--steps`` steps after one
compile and two warm-up steps.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jft.models
from jft import train
from jft.train import losses, parallel

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12: pass --peak
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "TPU v2": 46e12,
}

OPS = {
    "convolution": r"= \S+ convolution\(",
    "reduce-window": r"= \S+ reduce-window\(",
    "select-and-scatter": r"= \S+ select-and-scatter\(",
    "opt-barrier": r"= \S+ opt-barrier\(",
    "custom-call": r"= \S+ custom-call\(",
}


def peak_flops(device: jax.Device, given: float | None) -> float | None:
    """The chip's dense bf16 peak, from ``given`` or the table; None if unknown."""
    if given:
        return given
    kind = device.device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def image_batch(n: int, size: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


def text_batch(n: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, vocab, (n, length)).astype(np.int32),
        "attention_mask": np.ones((n, length), np.int32),
        "token_type_ids": np.zeros((n, length), np.int32),
        "label": rng.integers(0, 2, n).astype(np.int32),
    }


def text_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def build(model, batch, inputs, rules, mode="jit", compute_dtype=None, mesh=None):
    """A placed state, a step and a placed batch for ``model``."""
    par = parallel.Parallel(mode, mesh)
    args, kwargs = train.inputs.model_args(inputs, {k: v[:2] for k, v in batch.items()})
    variables = jax.jit(model.init)(jax.random.key(0), *args, **kwargs)
    state = par.place_state(train.create_train_state(variables, rules))
    step = train.make_train_step(
        model,
        rules,
        losses.get("softmax_xent"),
        inputs=inputs,
        parallel=par,
        compute_dtype=compute_dtype,
    )
    return state, step, par.shard_batch(batch)


def count_ops(hlo: str) -> dict[str, int]:
    return {name: len(re.findall(pattern, hlo)) for name, pattern in OPS.items()}


def kernels_table(quick: bool) -> None:
    import jft.ops

    size, n = (32, 8) if quick else (224, 32)
    batch = image_batch(n, size, 10)
    rules = [(".*", optax.sgd(0.1))]
    counts = {}
    for label, on in (("jft", True), ("CPU kernels off", False)):
        with jft.ops.cpu_kernels(on):
            model = jft.models.get("resnet18" if quick else "resnet50", num_classes=10)
            state, step, placed = build(model, batch, "image", rules, mode="none")
            counts[label] = count_ops(step.lower(state, placed).compile().as_text())
    print(f"\n1. ops in the compiled ResNet train step on {jax.default_backend()}")
    print(f"{'op':<20}{'jft':>8}{'CPU kernels off':>18}")
    for op in OPS:
        print(f"{op:<20}{counts['jft'][op]:>8}{counts['CPU kernels off'][op]:>18}")
    if jax.default_backend() != "cpu":
        same = counts["jft"] == counts["CPU kernels off"]
        print("identical programs' op counts:", "yes" if same else "NO: CPU code leaked")


def layouts_table() -> None:
    model = jft.models.get("cnn", widths=(8, 16), num_classes=10, dropout_rate=0.0)
    rng = np.random.default_rng(0)
    per_device = 4
    n = per_device * jax.device_count()
    data = [
        {
            "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32),
        }
        for _ in range(10)
    ]
    rules = [(".*", optax.sgd(0.1))]
    results = {}
    for mode in ("none", "jit", "pmap"):
        state, step, _ = build(model, data[0], "image", rules, mode=mode)
        for batch in data:
            state, _ = step(state, parallel.shard_batch(batch, mode))
        results[mode] = jax.tree.map(np.asarray, parallel.host_state(state, mode))
    want = jax.tree.leaves((results["none"].params, results["none"].batch_stats))
    print(f"\n2. layouts: small CNN, 10 SGD steps, {jax.device_count()} device(s)")
    print(f"{'mode':<8}{'largest scaled difference to one device':>42}")
    for mode in ("jit", "pmap"):
        got = jax.tree.leaves((results[mode].params, results[mode].batch_stats))
        worst = max(
            float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w))))
            for g, w in zip(got, want, strict=True)
        )
        print(f"{mode:<8}{worst:>42.2e}")


def time_step(state, step, batch, steps: int, rounds: int) -> tuple[float, object]:
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), state


def speed_table(quick: bool, steps: int, rounds: int, peak: float | None) -> None:
    devices = jax.device_count()
    if quick:
        cases = [
            ("resnet18 32x32", "resnet18", {}, image_batch(2 * devices, 32, 10), "image"),
            (
                "vit_ti16 32x32",
                "vit_ti16",
                {"image_size": 32},
                image_batch(2 * devices, 32, 10),
                "image",
            ),
            ("minilm_l6 seq 16", "minilm_l6", {}, text_batch(2 * devices, 16, 1000), text_inputs),
        ]
    else:
        cases = [
            ("resnet50 224x224", "resnet50", {}, image_batch(128, 224, 1000), "image"),
            ("vit_b16 224x224", "vit_b16", {}, image_batch(128, 224, 1000), "image"),
            ("bert_base seq 128", "bert_base", {}, text_batch(64, 128, 30522), text_inputs),
        ]
    chip = peak_flops(jax.devices()[0], peak)
    print(f"\n3. train step, bf16 compute, AdamW, {devices} x {jax.devices()[0].device_kind}")
    header = (
        f"{'model':<20}{'batch':>6}{'ms/step':>10}{'TFLOP/step':>12}{'TFLOP/s':>9}{'of peak':>9}"
    )
    print(header)
    for label, name, kwargs, batch, inputs in cases:
        classes = 2 if inputs is text_inputs else 10 if quick else 1000
        model = jft.models.get(name, num_classes=classes, **kwargs)
        rules = [(".*", optax.adamw(1e-4))]
        state, step, placed = build(model, batch, inputs, rules, compute_dtype=jnp.bfloat16)
        cost = step.lower(state, placed).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        seconds, _ = time_step(state, step, placed, steps, rounds)
        achieved = flops / seconds
        frac = f"{achieved / (chip * devices):.1%}" if chip else "?"
        n = len(next(iter(batch.values())))
        print(
            f"{label:<20}{n:>6}{seconds * 1e3:>10.2f}{flops / 1e12:>12.3f}"
            f"{achieved / 1e12:>9.1f}{frac:>9}"
        )
    if not chip:
        print("(peak unknown for this chip: pass --peak FLOPS for the 'of peak' column)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models: check the script on a CPU")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks (the median is printed)")
    p.add_argument("--peak", type=float, default=None, help="peak bf16 FLOP/s of one chip")
    args = p.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices: {jax.devices()}")
    kernels_table(args.quick)
    layouts_table()
    speed_table(args.quick, args.steps, args.rounds, args.peak)


if __name__ == "__main__":
    main()
