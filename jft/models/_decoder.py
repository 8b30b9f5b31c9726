"""Pieces shared by the decoder language models (:mod:`jft.models.gpt2`, :mod:`jft.models.llama`).

Attention works on *slots*: with no cache the slots are the ``T`` input
positions; with a KV cache of length ``S`` the ``T`` new tokens sit in slots
``cache_index .. cache_index + T - 1`` and attend to every earlier slot whose
``attention_mask`` is 1. The causal and sliding-window masks compare slots (as
Hugging Face's ``cache_position`` does), while RoPE and learned position
embeddings read the *position ids*, which with left padding differ from slots.

Also here: RoPE (:func:`rope_frequencies`, :func:`apply_rope`) and
:class:`RMSNorm`, in ``transformers``' conventions, and the remat policies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models.layers import dense, fields_for
from jft.ops import dot_general

Dtype = Any
# One layer's cache: {"k": (B, S, kv_heads, head_dim), "v": same}.
LayerCache = dict[str, jax.Array]
Cache = tuple[LayerCache, ...]

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


class DecoderConfigError(JftError, ValueError):
    """A decoder model field that jft does not support."""


def no_head(num_classes: int) -> None:
    """Refuses a classifier head: the registry passes ``num_classes`` to every model.

    Raises:
      DecoderConfigError: ``num_classes`` is not 0.
    """
    if num_classes:
        raise DecoderConfigError(
            f"num_classes={num_classes}: a causal language model has no classifier head "
            "(its lm_head predicts tokens); set num_classes=0 (config.model.num_classes)"
        )


def remat_block(block: type[nn.Module], remat: str | None) -> type[nn.Module]:
    """``block`` wrapped in ``nn.remat`` with the named policy (None: unchanged).

    Raises:
      DecoderConfigError: an unknown policy name.
    """
    if remat is None:
        return block
    if remat not in REMAT_POLICIES:
        raise DecoderConfigError(
            f"remat={remat!r} is not a policy; use one of {', '.join(REMAT_POLICIES)} or None"
        )
    return nn.remat(block, policy=REMAT_POLICIES[remat])


def layer_types(
    types: tuple[str, ...] | None, num_layers: int, sliding_window: int | None
) -> tuple[str, ...]:
    """Each layer's attention, ``"full_attention"`` or ``"sliding_attention"``.

    None: all sliding when there is a ``sliding_window`` (Mistral), else all full.

    Raises:
      DecoderConfigError: ``types`` is not ``num_layers`` entries of :data:`LAYER_TYPES`.
    """
    if types is None:
        kind = "full_attention" if sliding_window is None else "sliding_attention"
        return (kind,) * num_layers
    types = tuple(types)
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise DecoderConfigError(
            f"layer_types {list(types)} must list {num_layers} entries of {', '.join(LAYER_TYPES)}"
        )
    return types


class DecoderTrunk(nn.Module):
    """A decoder trunk: it says its KV cache's shape (``cache_spec``) and makes an empty one."""

    def cache_spec(self) -> tuple[int, int, int]:
        """``(num_layers, kv_heads, head_dim)`` of this model's KV cache."""
        raise NotImplementedError

    def init_cache(self, batch: int, length: int, dtype: Dtype | None = None) -> Cache:
        """An empty KV cache of ``length`` slots (``dtype`` default: the compute dtype)."""
        layers, kv_heads, head_dim = self.cache_spec()
        return init_cache(layers, batch, length, kv_heads, head_dim, dtype or self.dtype)


class LanguageModel(nn.Module):
    """A causal LM's ``__call__``: its trunk ``backbone/``, then the LM head, logits in float32.

    A model derives from this and from its trunk, whose fields it shares
    (``class Llama(LanguageModel, LlamaBackbone)``), and names the trunk in
    ``backbone_class``. The head is the transposed token embedding when
    ``tie_word_embeddings``, else a bias-free ``lm_head`` Dense.
    """

    backbone_class: ClassVar[type[nn.Module]]

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """The final logits (Gemma 2 soft-caps them); here unchanged."""
        return logits

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        train: bool = False,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Logits ``(B, T, vocab)`` float32, and the new cache when ``cache`` is given."""
        backbone = self.backbone_class(**fields_for(self.backbone_class, self), name="backbone")
        hidden, new_cache, embedding = backbone(
            jnp.asarray(input_ids), attention_mask, position_ids, cache, cache_index, train
        )
        if self.tie_word_embeddings:
            logits = dot_general(
                hidden, embedding.astype(hidden.dtype).T, (((hidden.ndim - 1,), (0,)), ((), ()))
            )
        else:
            logits = dense(
                self.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(0.02),
                name="lm_head",
            )(hidden)
        logits = self.cap_logits(logits.astype(jnp.float32))
        return logits if cache is None else (logits, new_cache)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``(B, T)`` that skip padding: ``cumsum(mask) - 1``, 0 on leading padding.

    Equal to ``arange(T)`` without padding or with right padding; with left padding
    each row's first real token gets position 0 (as ``transformers``' ``generate``).
    A packed row's mask holds segment ids (``1, 2, ...`` increasing along the row, 0
    on padding): the positions restart at 0 where a new document begins.
    """
    mask = attention_mask.astype(jnp.int32)
    count = jnp.cumsum((mask != 0).astype(jnp.int32), axis=-1)
    seen = jax.lax.cummax(mask, axis=mask.ndim - 1)
    starts = mask > jnp.pad(seen[..., :-1], [(0, 0)] * (mask.ndim - 1) + [(1, 0)])
    before = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=mask.ndim - 1)
    return jnp.maximum(count - 1 - before, 0)


def slot_bias(kv_mask: jax.Array, q_slots: jax.Array, window: int | None = None) -> jax.Array:
    """Additive float32 bias ``(B, T, S)``: 0 where query slot ``t`` may see key slot ``s``.

    A key is visible when it is not padding (``kv_mask`` ``(B, S)`` is not 0), not in the
    future (``s <= t``), in the query's document (a packed row's mask holds segment
    ids ``1, 2, ...``: a key of another id is hidden) and, with a ``window``, less than
    ``window`` slots back (``s > t - window``, Mistral's and Gemma 2's sliding window).
    """
    s = jnp.arange(kv_mask.shape[-1])
    keep = (s[None, :] <= q_slots[:, None])[None] & (kv_mask != 0)[:, None, :]
    q_seg = jnp.take(kv_mask, q_slots, axis=1)[:, :, None]  # a padding query keeps its view
    keep &= (kv_mask[:, None, :] == q_seg) | (q_seg == 0)
    if window is not None:
        keep &= (s[None, :] > q_slots[:, None] - window)[None]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention: ``q`` ``(B, T, H, D)``, ``k, v`` ``(B, S, K, D)`` -> ``(B, T, HD)``.

    Each group of ``H // K`` query heads shares one key/value head. Logits are
    ``q·k * scale``, optionally soft-capped (``tanh(x / c) * c``, Gemma 2), in
    float32 with ``bias`` from :func:`slot_bias`; the softmax runs in float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(scale, q.dtype)
    logits = logits.astype(jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    probs = jax.nn.softmax(logits + bias[:, None, None], axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)


def write_cache(
    layer: LayerCache, k: jax.Array, v: jax.Array, index: jax.Array | int
) -> LayerCache:
    """``layer`` with ``k, v`` ``(B, T, K, D)`` written into slots ``index .. index + T - 1``."""

    def put(buf: jax.Array, new: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index, 0, 0))

    return {"k": put(layer["k"], k), "v": put(layer["v"], v)}


def cached_kv(
    layer: LayerCache | None, k: jax.Array, v: jax.Array, index: jax.Array | int
) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """The keys and values to attend to, and the layer's new cache (None without a cache).

    Without a cache they are ``k, v``; with one, ``k, v`` are written at ``index``
    (:func:`write_cache`) and the whole cache is attended to.
    """
    if layer is None:
        return k, v, None
    new = write_cache(layer, k, v, index)
    return new["k"], new["v"], new


def init_cache(
    num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Dtype
) -> Cache:
    """An empty (zero) KV cache of ``length`` slots for each of ``num_layers`` layers."""
    shape = (batch, length, kv_heads, head_dim)
    return tuple(
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)
    )


def slots_and_mask(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    cache: Cache | None,
    cache_index: jax.Array | int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q_slots (T,), kv_mask (B, S), position_ids (B, T))`` for one call of a decoder.

    Without a cache, ``attention_mask`` ``(B, T)`` (default ones) masks the inputs.
    With one, it is ``(B, S)`` and covers the whole cache (1 for every slot that
    holds or will hold a real token).
    """
    b, t = input_ids.shape
    length = t if cache is None else cache[0]["k"].shape[1]
    if attention_mask is None:
        attention_mask = jnp.ones((b, length), jnp.int32)
    if attention_mask.shape != (b, length):
        what = "the input ids" if cache is None else "the cache length"
        raise DecoderConfigError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, length)} "
            f"(batch, {what})"
        )
    q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    if position_ids is None:
        all_positions = positions_from_mask(attention_mask)
        position_ids = jax.lax.dynamic_slice_in_dim(all_positions, cache_index, t, axis=1)
    return q_slots, attention_mask, jnp.broadcast_to(position_ids, (b, t))


def rope_frequencies(
    head_dim: int,
    theta: float = 10000.0,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position: int = 8192,
) -> np.ndarray:
    """RoPE inverse frequencies ``(head_dim // 2,)`` float32, as ``transformers`` computes them.

    ``"linear"`` divides them by ``factor``; ``"llama3"`` divides the low
    frequencies by ``factor``, keeps the high ones and blends in between
    (Llama 3.1's ``rope_scaling``).

    Raises:
      DecoderConfigError: an unknown ``rope_type``.
    """
    if rope_type not in ROPE_TYPES:
        raise DecoderConfigError(
            f"rope_type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
        )
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (1.0 / np.float32(theta) ** exponent).astype(np.float32)
    if rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original_max_position / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv


def rope_tables(position_ids: jax.Array, inv: np.ndarray, dtype: Dtype) -> tuple[jax.Array, ...]:
    """``(cos, sin)`` ``(B, T, head_dim)`` of the angles ``position * inv``, halves repeated."""
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` ``(B, T, H, D)`` rotated as Hugging Face does (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32: ``x / rms(x) * w`` (Llama) or ``* (1 + w)`` (Gemma).

    Llama casts the normalized value back to the input dtype before the weight;
    Gemma multiplies in float32 first, as ``transformers`` does for each.
    """

    eps: float = 1e-6
    plus_one: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes over the last axis; the output has ``x``'s dtype."""
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * y.astype(x.dtype)
