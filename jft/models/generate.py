"""Text generation with a KV cache for the decoder models (:class:`~jft.models.gpt2.GPT2`, Llama).

:func:`generate` runs the prompt once through the model (the *prefill*, which
fills the cache), then one compiled *decode step* per new token: the step takes
the last token, writes its keys and values into the cache slot ``index`` (a
traced scalar) and picks the next token, so the 20th token runs the same program
as the 2nd. Prompts of different lengths are left-padded (``attention_mask`` 0 on
the left); each row's position ids skip its padding, as ``transformers`` does.

Token choice, in ``transformers``' order: greedy (``temperature=0``), or
logits divided by ``temperature``, then ``top_k`` (0: off), then ``top_p``
(nucleus; 1: off), then a categorical sample. A row that emits one of
``stop_tokens`` is finished: it gets ``pad_id`` from then on, and generation ends
early when every row is finished.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.models._decoder import Cache, DecoderConfigError

__all__ = ["TRACES", "choose_tokens", "decode_step", "generate", "prefill"]

# How many times each compiled step was traced: tests (and users) check that a
# generation of N tokens traces the decode step once, not N times.
TRACES: collections.Counter[str] = collections.Counter()


def choose_tokens(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.typing.ArrayLike = 1.0,
    top_k: jax.typing.ArrayLike = 0,
    top_p: jax.typing.ArrayLike = 1.0,
    *,
    sample: bool = True,
) -> jax.Array:
    """The next tokens ``(B,)`` from ``logits`` ``(B, V)``: argmax, or a filtered sample.

    With ``sample``: ``logits / temperature``; keep the ``top_k`` largest (0:
    all); keep the smallest set of largest logits whose probability reaches
    ``top_p`` (at least one); sample. The hyperparameters are traced, so changing
    them does not recompile.
    """
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.asarray(top_k, jnp.int32)
    kth = jnp.take(desc, jnp.clip(k - 1, 0, vocab - 1), axis=-1)[:, None]
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.where((k > 0) & (logits < kth), neg, logits)
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the larger logits
    kept = jnp.maximum(jnp.sum(before < jnp.asarray(top_p, jnp.float32), axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)
    logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill(
    model: nn.Module, variables: Any, input_ids: jax.Array, kv_mask: jax.Array, cache: Cache
) -> tuple[jax.Array, Cache]:
    """Runs the prompt ``(B, P)`` into slots ``0..P-1``; returns the last logits ``(B, V)``."""
    TRACES["prefill"] += 1
    logits, cache = model.apply(variables, input_ids, kv_mask, cache=cache, cache_index=0)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("model", "sample"), donate_argnames=("cache",))
def decode_step(
    model: nn.Module,
    variables: Any,
    tokens: jax.Array,
    kv_mask: jax.Array,
    cache: Cache,
    index: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    sample: bool,
) -> tuple[jax.Array, Cache]:
    """Feeds ``tokens`` ``(B,)`` at cache slot ``index``; returns the next tokens and the cache."""
    TRACES["decode_step"] += 1
    logits, cache = model.apply(variables, tokens[:, None], kv_mask, cache=cache, cache_index=index)
    return choose_tokens(logits[:, -1], key, temperature, top_k, top_p, sample=sample), cache


def generate(
    model: nn.Module,
    variables: Any,
    input_ids: jax.typing.ArrayLike,
    attention_mask: jax.typing.ArrayLike | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    rng: jax.Array | None = None,
    cache_dtype: Any = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens; returns them ``(B, max_new_tokens)``.

    Args:
      model: a decoder with ``init_cache`` (:class:`~jft.models.gpt2.GPT2`,
        :class:`~jft.models.llama.Llama`).
      variables: its variables.
      input_ids: prompts ``(B, P)``, left-padded.
      attention_mask: ``(B, P)``, 1 for tokens, 0 for the left padding; default all ones.
      max_new_tokens: how many tokens to generate.
      temperature: 0: greedy (argmax); else the sampling temperature.
      top_k: sample among the ``top_k`` most likely tokens (0: all).
      top_p: sample among the most likely tokens whose probability reaches ``top_p``.
      stop_tokens: token ids that finish a row (the stop token is kept, then ``pad_id``).
      pad_id: the token written after a row has finished.
      rng: PRNG key for sampling; default ``key(0)``.
      cache_dtype: dtype of the KV cache; default the model's compute dtype.

    Returns:
      ``(B, max_new_tokens)`` int32 new tokens.

    Raises:
      DecoderConfigError: a prompt whose last position is padding (right padding).

    >>> from jft.models.llama import llama
    >>> model = llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
    ...               intermediate_size=64)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> generate(model, variables, jnp.array([[0, 5, 6], [1, 2, 3]]),
    ...          jnp.array([[0, 1, 1], [1, 1, 1]]), max_new_tokens=5).shape
    (2, 5)
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    b, p = ids.shape
    mask = jnp.ones((b, p), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if not bool(np.all(np.asarray(mask)[:, -1])):
        raise DecoderConfigError(
            "generate: a prompt ends in padding (attention_mask[:, -1] == 0); pad prompts "
            "on the left (tokenizer padding_side='left')"
        )
    if max_new_tokens < 1:
        raise DecoderConfigError(f"generate: max_new_tokens={max_new_tokens}, expected >= 1")
    length = p + max_new_tokens
    # The slots of the new tokens are real tokens; the causal mask hides them until written.
    kv_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((b, max_new_tokens), jnp.int32)], 1)
    cache = model.init_cache(b, length, cache_dtype)
    sample = temperature > 0
    rng = jax.random.key(0) if rng is None else rng
    hyper = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    logits, cache = prefill(model, variables, ids, kv_mask, cache)
    rng, key = jax.random.split(rng)
    token = choose_tokens(logits, key, *hyper, sample=sample)
    stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    done = jnp.zeros((b,), bool)
    out = []
    for j in range(max_new_tokens):
        token = jnp.where(done, pad_id, token)
        out.append(token)
        done = done | jnp.isin(token, stops)
        if j == max_new_tokens - 1 or bool(done.all()):
            break
        rng, key = jax.random.split(rng)
        token, cache = decode_step(
            model, variables, token, kv_mask, cache, jnp.int32(p + j), key, *hyper, sample=sample
        )
    tokens = jnp.stack(out, axis=1)
    if tokens.shape[1] < max_new_tokens:
        fill = jnp.full((b, max_new_tokens - tokens.shape[1]), pad_id, jnp.int32)
        tokens = jnp.concatenate([tokens, fill], axis=1)
    return tokens
