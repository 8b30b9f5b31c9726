"""QLoRA: LoRA r=8 on a frozen base stored in bfloat16, as int8 and as NF4 (``qwix``), side by side.

    python benchmarks/qlora.py                  # Llama ~134 M and MiniLM-L6 (~4 min, 2 cores)
    python benchmarks/qlora.py --quick          # a tiny Llama only (a smoke run, < 1 min)
    python benchmarks/qlora.py --models llama   # one model
    JAX_PLATFORMS=cuda python benchmarks/qlora.py   # the same on a GPU

Models, random weights (neither memory nor time depends on them):

* ``llama``: decoder.py's ``--load`` config (vocabulary 32000, hidden 768, 12
  layers of 12 heads, MLP 2048, untied ``lm_head``: about 134 M parameters),
  batch 2 x 128 tokens, causal LM loss; LoRA on every layer's ``q_proj`` and
  ``v_proj``. ``lm_head`` is frozen and, as bitsandbytes' QLoRA does, not
  quantized (it stays bfloat16).
* ``minilm``: MiniLM-L6 with a 2-class head, batch 8 x 128 tokens; LoRA on every
  layer's attention ``query`` and ``value``; the head trains (and stays float32).

Rows, each in its own subprocess (so each peak RSS is its own), all LoRA r=8,
alpha=16 with Adam (lr 1e-3) on the adapters, computing in bfloat16
(``make_train_step(..., compute_dtype=jnp.bfloat16)``):

* ``bf16``: the reference: every frozen float parameter cast to bfloat16 before
  ``create_train_state``.
* ``int8``: the same, then ``jft.peft.quantize_base(params, "int8")``: every
  frozen kernel int8 with a float32 scale per output feature.
* ``nf4``: the same with ``"nf4"``: 4-bit NormalFloat codes packed two a byte,
  a float32 scale per block of 64 weights along the input axis.

Columns (ratios are to the ``bf16`` row of the same model):

* ``bits/w``: stored bits per weight of the base's kernels (scales included;
  ``jft.peft.bits_per_weight``), the head and the embeddings left out.
* ``frozen``: bytes of the frozen parameters (``state.frozen``: the kernels,
  scales, embeddings and norms), and the ratio.
* ``XLA buffers``: what the compiled step's buffers take by XLA's own account
  (``memory_analysis()``: arguments, outputs not donated into them, and the
  temporaries), and the ratio: the memory the step needs, without the host
  process's noise; on a GPU, its device memory.
* ``at rest``: the process's RSS once the state is built and the step compiled
  and run once, after ``malloc_trim``: the state, the JAX runtime, compiled
  programs and whatever the allocator kept from building them.
* ``peak RSS``: the process's peak RSS during the timed steps: its peak counter
  is reset (``/proc/self/clear_refs``) at rest, as in decoder.py; and the ratio.
* ``above start``: that peak less the RSS before the model was built (JAX
  imported and its CPU client started): what the row's parameters, optimizer
  state, gradients, activations and compiled step hold; and the ratio.
* ``step``: the median time of the timed steps, and the ratio.
* ``loss``: the loss of the first step and of the last (the same batch every
  step, so it falls if the adapters train).
"""

from __future__ import annotations

import argparse
import os
import sys

from _harness import mib as _mib
from _harness import run_rows, subprocess_env, timed_steps, worker_main

MODELS = ("llama", "minilm")
VARIANTS = ("bf16", "int8", "nf4")
LLAMA = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
    num_kv_heads=12, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_QUICK = dict(
    LLAMA, vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=4,
)  # fmt: skip
LR = 1e-3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _setup(name: str, quick: bool):
    """(model, variables, batch, example inputs, loss, LoRA targets, trained also, skip)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jft.models
    from jft.train import losses

    rng = np.random.default_rng(0)
    key = jax.random.key(0, impl="rbg")  # threefry's random init compiles slowly on CPU
    if name == "llama":
        c = LLAMA_QUICK if quick else LLAMA
        batch_size, seq = (2, 32) if quick else (2, 128)
        model = jft.models.get("llama", **c)
        ids = jnp.asarray(rng.integers(0, c["vocab_size"], (batch_size, seq)), jnp.int32)
        batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
        loss_fn = losses.get("causal_lm_xent", label_smoothing=0.0)
        targets = r"backbone/layers_\d+/attention/(q_proj|v_proj)"
        also, skip = (), ("lm_head",)
    else:
        batch_size, seq = (2, 32) if quick else (8, 128)
        model = jft.models.get("minilm_l6", num_classes=2)
        ids = jnp.asarray(rng.integers(1000, 30000, (batch_size, seq)), jnp.int32)
        batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
        batch["label"] = jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32)

        def loss_fn(logits, b):
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

        targets = r"backbone/encoder/layer_\d+/attention/(query|value)"
        also, skip = ("head/.*",), ("head",)
    example = (ids[:1, :8],)
    variables = jax.jit(model.init)(key, *example)
    return model, variables, batch, example, loss_fn, targets, also, skip


def worker(name: str, variant: str, steps: int, quick: bool) -> dict:
    """One (model, variant) alone in its process: sizes, peak RSS, step time, losses."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    import jft.optim
    import jft.peft
    from jft import partition, train

    jax.devices()  # the CPU client, before the starting RSS
    start = _rss()
    model, variables, batch, example, loss_fn, targets, also, skip = _setup(name, quick)
    config = jft.peft.LoraConfig(
        targets=(targets,), rank=8, alpha=16, quantize="" if variant == "bf16" else variant
    )
    model = jft.peft.lora(model, config)
    variables = jft.peft.init_adapters(model, variables, *example)
    rules = jft.peft.adapter_rules(jft.optim.adam(LR), also=also)
    trainable, frozen = partition.split(variables["params"], rules)
    del variables
    bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
    params = partition.merge(trainable, jax.tree.map(bf16, frozen))
    del trainable, frozen
    if variant != "bf16":
        params = jft.peft.quantize_base(params, variant, skip=list(skip))
    bits = jft.peft.bits_per_weight({k: v for k, v in params.items() if k not in skip})
    state = train.create_train_state({"params": params}, rules)
    del params
    step = train.make_train_step(model, rules, loss_fn, compute_dtype=jnp.bfloat16)

    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen))
    mem = step.memory_analysis()
    buffers = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    first_loss = float(metrics["loss"])
    _reset_peak()
    rest = _rss()
    state, metrics, times = timed_steps(step, state, batch, steps)
    peak = _hwm()
    return {
        "model": name,
        "variant": variant,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "bits": bits,
        "frozen_bytes": frozen_bytes,
        "xla_buffers": buffers,
        "xla_temp": mem.temp_size_in_bytes,
        "trainable": sum(x.size for x in jax.tree.leaves(state.trainable)),
        "params": sum(x.size for x in jax.tree.leaves(state.frozen))
        + sum(x.size for x in jax.tree.leaves(state.trainable)),
        "peak_rss_bytes": peak,
        "peak_above_start": peak - start,
        "rest_rss_bytes": rest,
        "step_s": min(times),
        "median_step_s": statistics.median(times),
        "compile_s": compile_s,
        "first_loss": first_loss,
        "loss": float(metrics["loss"]),
    }


def _table(rows: dict[tuple[str, str], dict], models: list[str]) -> str:
    lines = []
    header = (
        f"{'base':<5} {'bits/w':>6} {'frozen':>18} {'XLA buffers':>18} {'at rest':>11} "
        f"{'peak RSS':>18} {'above start':>18} {'step':>14}  {'loss first -> last':>18}"
    )
    for name in models:
        ref = rows[(name, "bf16")]
        batch = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in ref["batch"].items())
        lines += [
            f"{name}: {ref['params'] / 1e6:.1f} M parameters in bf16 ({ref['trainable']:,} "
            f"trained), random weights; {batch}",
            header,
            "-" * len(header),
        ]
        for variant in VARIANTS:
            r = rows[(name, variant)]
            cell = lambda key, r=r, ref=ref: f"{_mib(r[key]):>11} {r[key] / ref[key]:>5.2f}x"
            lines.append(
                f"{variant:<5} {r['bits']:>6.2f} {cell('frozen_bytes')} {cell('xla_buffers')} "
                f"{_mib(r['rest_rss_bytes']):>11} {cell('peak_rss_bytes')} "
                f"{cell('peak_above_start')} {r['median_step_s'] * 1e3:>6.0f}ms "
                f"{r['median_step_s'] / ref['median_step_s']:>5.2f}x  "
                f"{r['first_loss']:>8.4f} -> {r['loss']:.4f}"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Runs every (model, variant) in its own subprocess; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, short sequences")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    if worker_main(args, worker, steps):
        return
    env = subprocess_env(force_cpu=False)
    models = (args.models or ("llama" if args.quick else ",".join(MODELS))).split(",")
    rows = run_rows(__file__, models, VARIANTS, steps, args.quick, env)
    print(
        f"\nQLoRA: LoRA r=8 (Adam, lr {LR:g}) on a frozen base in bfloat16, int8 and nf4; "
        f"compute in bfloat16; {env['JAX_PLATFORMS']} ({os.cpu_count()} cores); each row "
        f"in its own process; step: the median of {steps}. Ratios are to the bf16 row.\n",
        file=sys.stdout,
    )
    print(_table(rows, models))


if __name__ == "__main__":
    main()
