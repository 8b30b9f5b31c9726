"""Steps per second of one training step in jft and in PyTorch eager, same model, batch, optimizer.

What is measured, per model: one whole training step (forward in train mode,
loss, backward, Adam update) on a fixed batch already in memory.

- jft: :func:`jft.train.make_train_step` (``parallel="none"``: ``jax.jit`` with
  the state donated and :func:`jft.models.compiler_options`), metrics included
  (loss, grad/update/param norms, the non-finite guard), timed to
  ``block_until_ready`` of the loss.
- PyTorch: the twin ``torch.nn`` model in train mode, ``zero_grad(set_to_none)``,
  forward, loss, ``backward()``, ``torch.optim.Adam(foreach=True).step()``, timed
  twice: with as many intra-op threads as JAX's CPU client gets (the cores this
  process may use), and with one thread (on a shared, loaded machine OpenMP's
  barriers can make the small models 10x slower with more threads). The ratio
  is taken against the faster of the two.

Models (float32, Adam lr 1e-3):

- ``mlp``: the 64-64-1 MLP (64 inputs, two hidden layers of 64, one logit),
  sigmoid binary cross-entropy, batch 64.
- ``cnn``: the small CNN (``jft.models.cnn``, widths 32-64-128, BatchNorm,
  dropout 0.1) on 32×32×3, softmax cross-entropy, batch 64.
- ``resnet18``: ResNet-18 (torchvision's layout) on 64×64×3, 10 classes, batch 32.

jft is timed twice: as the default step, and with ``norms=False``, which skips
the grad, update and param norms and so does what the torch step does (the
non-finite guard stays on). Each time is the median over rounds of the mean
step time of a block of steps, after warm-up; within a round the two jft
steps run first, then torch, then the script sleeps 0.5 s (torch's OpenMP
threads keep spinning after a step and would slow the next JAX call), so load
from other processes on a shared machine falls on all alike. Target: jft's step
time ≤ PyTorch's (ratio ≤ 1).

Run: ``python benchmarks/train_step.py [--rounds N] [--models mlp,cnn,resnet18]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jft.models
from jft import train

LR = 1e-3


# --------------------------------------------------------------------------- torch twins


class TorchMLP(nn.Module):
    """64 -> 64 -> 64 -> 1, ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )

    def forward(self, x):
        return self.net(x.flatten(1))


class TorchCNN(nn.Module):
    """jft.models.cnn: conv3x3-BN-ReLU stages, 2x2 max pools between, GAP, dropout, head."""

    def __init__(self, widths=(32, 64, 128), in_ch=3, num_classes=10, dropout=0.1):
        super().__init__()
        layers, c = [], in_ch
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.backbone = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.dropout(self.backbone(x).mean((2, 3))))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TorchResNet18(nn.Module):
    """torchvision's ResNet-18 layout (BasicBlock, [2, 2, 2, 2])."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, c = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            blocks += [_Block(c, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------- set-ups


def setup(name: str):
    """(jft model, loss name, torch model, torch loss, batch size, image shape HWC, classes)."""
    if name == "mlp":
        model = jft.models.get("mlp", widths=(64, 64), num_classes=1)
        return model, "sigmoid_xent", TorchMLP(), nn.BCEWithLogitsLoss(), 64, (8, 8, 1), 2
    if name == "cnn":
        model = jft.models.get("cnn", num_classes=10)
        return model, "softmax_xent", TorchCNN(), nn.CrossEntropyLoss(), 64, (32, 32, 3), 10
    if name == "resnet18":
        model = jft.models.get("resnet18", num_classes=10)
        return model, "softmax_xent", TorchResNet18(), nn.CrossEntropyLoss(), 32, (64, 64, 3), 10
    raise ValueError(f"unknown model {name!r}")


def make_runners(name: str):
    """Two callables, each running ``n`` steps and returning when they are done."""
    model, loss_name, tmodel, tloss, batch, hwc, classes = setup(name)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, *hwc)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int32)

    # jft
    variables = jax.jit(model.init)(jax.random.key(0), images[:2])
    rules = [(".*", optax.adam(LR))]
    jbatch = train.shard_batch({"image": images, "label": labels}, "none")

    def jft_runner(norms: bool):
        state = train.create_train_state(jax.tree.map(jnp.copy, variables), rules)
        step = train.make_train_step(model, rules, train.losses.get(loss_name), norms=norms)

        def run(n: int) -> None:
            nonlocal state
            for _ in range(n):
                state, metrics = step(state, jbatch)
            metrics["loss"].block_until_ready()

        return run

    run_jft, run_jft_plain = jft_runner(True), jft_runner(False)

    # torch
    tmodel.train()
    opt = torch.optim.Adam(tmodel.parameters(), lr=LR, foreach=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = (
        torch.from_numpy(labels).float()[:, None]
        if loss_name == "sigmoid_xent"
        else torch.from_numpy(labels).long()
    )
    if loss_name == "sigmoid_xent":
        y = (y > 0).float()

    def run_torch(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = tloss(tmodel(x), y)
            loss.backward()
            opt.step()

    return run_jft, run_jft_plain, run_torch


def timed(run, n: int) -> float:
    t = time.perf_counter()
    run(n)
    return (time.perf_counter() - t) / n


def bench(name: str, rounds: int, budget_s: float, threads: int) -> tuple[float, ...]:
    """Median seconds per step (jft, jft without norms, torch with ``threads``, torch with 1)."""
    run_jft, run_jft_plain, run_torch = make_runners(name)

    def torch_with(n_threads):
        def run(n):
            torch.set_num_threads(n_threads)
            run_torch(n)

        return run

    runs = [run_jft, run_jft_plain, torch_with(threads), torch_with(1)]
    for run in runs:  # compile, warm up
        run(2)
    time.sleep(0.5)
    # Steps per block: about budget_s / rounds seconds per round for the four.
    probe = sum(max(timed(run, 2), 1e-5) for run in runs)
    n = max(1, int(budget_s / rounds / probe))
    times = [[] for _ in runs]
    for _ in range(rounds):
        for i, (run, t) in enumerate(zip(runs, times, strict=True)):
            t.append(timed(run, n))
            if i >= 2:
                time.sleep(0.5)
    return tuple(statistics.median(t) for t in times)


def main() -> None:
    """Parses the flags, times each model, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="mlp,cnn,resnet18")
    parser.add_argument("--budget", type=float, default=20.0, help="timed seconds per model")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({threads} threads)"
    )
    rows = []
    for name in args.models.split(","):
        j, jp, t, t1 = bench(name, args.rounds, args.budget, threads)
        rows.append((name, j, jp, t, t1))
        print(
            f"  {name}: jft {j * 1e3:.3f} (no norms {jp * 1e3:.3f}), "
            f"torch {t * 1e3:.3f} / {t1 * 1e3:.3f} ms",
            flush=True,
        )
    print()
    header = (
        f"{'model':<9} {'jft ms':>9} {'no norms':>9} {f'torch {threads}t':>9} {'torch 1t':>9} "
        f"{'jft/torch':>10} {'no norms/torch':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, j, jp, t, t1 in rows:
        best = min(t, t1)
        print(
            f"{name:<9} {j * 1e3:>9.3f} {jp * 1e3:>9.3f} {t * 1e3:>9.3f} {t1 * 1e3:>9.3f} "
            f"{j / best:>10.2f} {jp / best:>15.2f}"
        )
    print(
        "(ms per step; ratios against the faster torch thread setting; 'no norms' is\n"
        " make_train_step(norms=False), the same work as the torch step: no grad,\n"
        " update or param norms)"
    )


if __name__ == "__main__":
    jnp.zeros(())  # start the JAX client before torch's threads
    main()
