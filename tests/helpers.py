"""Small helpers that several test files share (no torch here: see torch_refs.py for that)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

JFT_BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
"""jft's twin of torch_refs.BERT_CFG."""
JFT_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
"""jft's twin of torch_refs.VIT_CFG."""
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
"""A tiny Llama's Llama 3 RoPE scaling in transformers' ``rope_parameters`` (16 positions)."""
QV = r"backbone/encoder/layer_\d+/attention/(query|value)"
"""LoRA targets: a BERT encoder's query and value projections."""


def key(seed=0):
    # rbg keys: threefry's random init takes seconds to compile on CPU.
    return jax.random.key(seed, impl="rbg")


def xent(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0]
    return cost["flops"]


def perturbed(params, scale=0.1, seed=1):
    """Random non-zero adapters (B starts at 0, which would hide a wrong B)."""
    rng = np.random.default_rng(seed)

    def move(path, x):
        if str(path[-1].key).startswith("lora_"):
            return x + jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(move, params)
