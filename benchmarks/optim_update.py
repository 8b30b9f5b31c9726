"""Time one optimizer step of each jft.optim rule against its optax and torch.optim twins.

What is measured: the whole optimizer step on a pytree of about 10M float32
parameters in a few dozen leaves of mixed shapes (``--quick``: about 0.6M),
with fixed gradients:

- jft and optax: ``jax.jit`` of ``update`` + ``optax.apply_updates``, with the
  params and optimizer state donated (updated in place, as torch does); the
  gradients are an argument, not donated.
- torch: ``opt.step()``, in place, the gradients already in ``p.grad`` (no
  ``zero_grad``), with as many intra-op threads as JAX's CPU client gets here
  (all the cores this process may use); timed both with ``foreach=True`` and
  with torch's CPU default, one kernel per tensor (``foreach=False``), and the
  faster is the torch column. ``OMP_WAIT_POLICY=PASSIVE`` (set before torch
  loads) stops its OpenMP threads spinning after a step, so they do not slow
  the JAX call that follows.

So both sides do the same work: read params and gradients (and state), write
params (and state) in place; neither times a ``zero_grad`` or a copy.

Each time is the minimum over repeats of one step, after warm-up: the jft,
optax and torch steps of a rule are called in turn, so that load from other
processes on a shared machine falls on all alike, and the minimum is the run
that load did not touch (the median is printed too; on a quiet machine the two
agree). Bandwidth is the bytes one step must read and write at least (params,
gradients and every state buffer the rule keeps, in float32) divided by the
time, as a fraction of this machine's copy bandwidth measured in the same run
(the fastest of a jitted, donated ``x + 1``, ``np.copyto`` and torch's
``copy_`` over a buffer of as many float32 as the parameters, read + write,
timed in every rule's group so that it meets the same load).
``floor ms`` is that many bytes at copy bandwidth: no step can be faster.

Targets: jft ≤ 1.05× optax, ≤ 1.0× torch, ≥ 50 % of copy bandwidth.

Run: ``python benchmarks/optim_update.py [--quick] [--repeats N]``.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jft import optim

LR = 1e-3


def shapes(quick: bool) -> list[tuple[int, ...]]:
    """A few dozen leaves of mixed shapes, ~10M parameters (~0.6M with quick)."""
    d = 192 if quick else 768
    out = [(4 * d if quick else 4096, d // 2 if quick else 640)]  # embedding
    for _ in range(8):  # dense blocks: kernel, bias, norm scale
        out += [(d, 3 * d // 2), (3 * d // 2,), (d,)]
    out += [(3, 3, 32, 64), (3, 3, 64, 64), (3, 3, 64, 128), (128,), (1, 1, 128, 256)]
    return out


def torch_twin(cls, **kwargs):
    return lambda ps, foreach: cls(ps, lr=LR, foreach=foreach, **kwargs)


# name: (jft, optax twin or None, torch twin or None, float32 state buffers per param)
RULES = {
    "gradient_descent": (optim.gradient_descent(LR), optax.sgd(LR), torch_twin(torch.optim.SGD), 0),
    "momentum": (
        optim.momentum(LR, 0.9),
        optax.chain(optax.ema(0.9, debias=False), optax.scale_by_learning_rate(LR)),
        torch_twin(torch.optim.SGD, momentum=0.9, dampening=0.9),
        1,
    ),
    "heavy_ball": (
        optim.heavy_ball(LR, 0.9),
        optax.sgd(LR, momentum=0.9),
        torch_twin(torch.optim.SGD, momentum=0.9),
        1,
    ),
    "adaptive_rate": (optim.adaptive_rate(LR, 0.1), None, None, 0),
    "subgradient": (
        optim.subgradient(LR),
        optax.sgd(lambda t: LR / jnp.sqrt(t + 1.0)),
        torch_twin(torch.optim.SGD),  # cost twin: the lr change is a scheduler's
        0,
    ),
    "adagrad": (
        optim.adagrad(LR),
        optax.adagrad(LR, initial_accumulator_value=0.0, eps=1e-10),  # eps inside sqrt
        torch_twin(torch.optim.Adagrad),
        1,
    ),
    "rmsprop": (
        optim.rmsprop(LR),
        optax.rmsprop(LR, 0.99, eps_in_sqrt=False),
        torch_twin(torch.optim.RMSprop),
        1,
    ),
    "adam": (optim.adam(LR), optax.adam(LR), torch_twin(torch.optim.Adam), 2),
    "adamw": (
        optim.adamw(LR),
        optax.adamw(LR, weight_decay=0.01),
        torch_twin(torch.optim.AdamW),
        2,
    ),
    "adam+reduce_on_plateau": (
        optax.chain(optim.adam(LR), optim.reduce_on_plateau()),
        optax.chain(optax.adam(LR), optax.contrib.reduce_on_plateau()),
        None,
        2,
    ),
}


def interleaved_times(fns: list, repeats: int) -> list[tuple[float, float]]:
    """(minimum, median) time of each fn, calling them in turn so that load from
    other processes on a shared machine falls on all of them alike."""
    for fn in fns:
        for _ in range(3):  # warm-up, compilation
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [(min(ts), statistics.median(ts)) for ts in times]


def jax_step(tx, params, grads):
    """One donated jitted step (update + apply_updates), as a no-argument callable."""
    extra = "value" if isinstance(tx, optax.GradientTransformationExtraArgs) else None

    def step(params, state, grads):
        kwargs = {extra: jnp.float32(1.0)} if extra else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    carry = [jax.tree.map(jnp.copy, params), tx.init(params)]

    def once():
        carry[0], carry[1] = step(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    return once


def torch_step(make, shape_list, foreach: bool):
    """One in-place torch.optim step, as a no-argument callable."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, requires_grad=True) for s in shape_list]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return make(ps, foreach).step


def copies(n: int) -> dict[str, object]:
    """Read + write of n float32, as no-argument callables: jitted donated x + 1,
    np.copyto, torch's copy_ (8n bytes each)."""
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    box = [jnp.zeros(n, jnp.float32)]

    def jax_once():
        box[0] = add(box[0])
        box[0].block_until_ready()

    a, b = np.ones(n, np.float32), np.empty(n, np.float32)
    ta, tb = torch.ones(n), torch.empty(n)
    return {
        "jax x+1": jax_once,
        "np.copyto": lambda: np.copyto(b, a),
        "torch copy_": lambda: tb.copy_(ta),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated subset")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 20)

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    shape_list = shapes(args.quick)
    key = jax.random.key(0)
    leaves = []
    for i, s in enumerate(shape_list):
        leaves.append(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32))
    params = {f"p{i:02d}": x for i, x in enumerate(leaves)}
    grads = jax.tree.map(lambda x: 0.01 * x + 0.001, params)
    n = sum(x.size for x in leaves)

    # The copies are timed in each rule's group too, so that they meet the same
    # load; the bandwidth is the best any of them reached over the run.
    copy_fns = copies(n)
    best_copy = dict.fromkeys(copy_fns, 0.0)
    rows = []
    for name in args.rules.split(","):
        ours, theirs, torch_make, buffers = RULES[name]
        fns = [jax_step(ours, params, grads)]
        if theirs is not None:
            fns.append(jax_step(theirs, params, grads))
        if torch_make is not None:
            fns += [torch_step(torch_make, shape_list, foreach) for foreach in (True, False)]
        times = interleaved_times(fns + list(copy_fns.values()), repeats)
        for key, (t, _) in zip(copy_fns, times[len(fns) :], strict=True):
            best_copy[key] = max(best_copy[key], 8 * n / t)
        times = iter(times)
        t_jft, med_jft = next(times)
        t_optax = next(times)[0] if theirs is not None else None
        t_torch = min(next(times)[0], next(times)[0]) if torch_make is not None else None
        rows.append((name, t_jft, med_jft, t_optax, t_torch, 4 * n * (3 + 2 * buffers)))

    copy_bw = max(best_copy.values())
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), optax {optax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {threads} cores"
    )
    print(f"{n / 1e6:.2f}M float32 parameters in {len(leaves)} leaves; min (median) of {repeats}")
    print(
        "copy bandwidth (read + write): "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in best_copy.items())
        + f"; using {copy_bw / 1e9:.1f} GB/s"
    )
    header = (
        f"{'rule':<24}{'jft ms':>15}{'optax ms':>10}{'torch ms':>10}{'floor ms':>10}"
        f"{'jft/optax':>11}{'jft/torch':>11}{'GB/s':>7}{'% copy':>8}"
    )
    print(header)
    print("-" * len(header))
    fmt = lambda x, spec: "—" if x is None else format(x, spec)
    for name, t_jft, med_jft, t_optax, t_torch, moved in rows:
        # moved: params r+w, grads r, each state buffer r+w
        bw = moved / t_jft
        print(
            f"{name:<24}{t_jft * 1e3:>7.2f} ({med_jft * 1e3:5.2f})"
            f"{fmt(t_optax and t_optax * 1e3, '.2f'):>10}"
            f"{fmt(t_torch and t_torch * 1e3, '.2f'):>10}{moved / copy_bw * 1e3:>10.2f}"
            f"{fmt(t_optax and t_jft / t_optax, '.3f'):>11}"
            f"{fmt(t_torch and t_jft / t_torch, '.3f'):>11}"
            f"{bw / 1e9:>7.1f}{100 * bw / copy_bw:>7.0f}%"
        )
    print(
        "momentum's torch twin is SGD(momentum=0.9, dampening=0.9) and subgradient's is "
        "plain SGD: same cost, not the same numbers; optax.adagrad keeps eps inside sqrt."
    )


if __name__ == "__main__":
    main()
