"""Checkpoint size on disk of one step of a LoRA run, adapter-only against the whole state.

    python benchmarks/lora_checkpoint_size.py [--rank 8]

A BERT shaped as all-MiniLM-L6-v2 (6 layers, hidden 384, vocab 30522; random
weights: only the shapes matter), LoRA on the query and value projections plus
a 2-class head, Adam. Three checkpoints of the same step: the adapter-only one a
LoRA run writes (issue 17), the same state with its frozen base inside (what
LoRA runs wrote before), and full fine-tuning's (every parameter trained, Adam's
two moments for each).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile

import jax
import jax.numpy as jnp
import optax

import jft
from jft.peft import LoraConfig
from jft.train import Checkpointer, create_train_state

QV = r"backbone/encoder/layer_\d+/attention/(query|value)"
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def trained(state):
    # As after some steps: every float array noisy. orbax compresses, and writes no chunk of
    # an all-zero array, so Adam's moments and LoRA's B at init would cost nothing.
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def size(folder: str) -> int:
    files = glob.glob(f"{folder}/**", recursive=True)
    return sum(os.path.getsize(p) for p in files if os.path.isfile(p))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    model = jft.models.get("bert", num_classes=2, **MINILM)
    ids = jnp.ones((1, 16), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), ids)
    lora = jft.peft.lora(model, LoraConfig(targets=(QV,), rank=args.rank, alpha=2 * args.rank))
    variables = jft.peft.init_adapters(lora, base, ids)
    rules = jft.peft.adapter_rules(optax.adam(1e-3), also=["head/.*"])
    runs = {
        f"LoRA r={args.rank}, adapter-only": (create_train_state(variables, rules), "base"),
        f"LoRA r={args.rank}, base inside": (create_train_state(variables, rules), None),
        "full fine-tuning": (create_train_state(base, [(".*", optax.adam(1e-3))]), None),
    }
    runs = {name: (trained(state), frozen_base) for name, (state, frozen_base) in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for i, (name, (state, frozen_base)) in enumerate(runs.items()):
            folder = os.path.join(tmp, str(i))
            with Checkpointer(folder, every=1, async_save=False, frozen_base=frozen_base) as ck:
                ck.save(1, state, data_state={}, config={})
            sizes[name] = size(os.path.join(folder, "1"))
    full = sizes["full fine-tuning"]
    print(f"{'checkpoint of one step (MiniLM-L6 shapes)':<42} {'MiB':>8} {'vs full':>8}")
    for name, n in sizes.items():
        print(f"{name:<42} {n / 2**20:>8.2f} {n / full:>8.3f}")


if __name__ == "__main__":
    main()
