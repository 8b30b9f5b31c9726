"""Pieces shared by the encoder transformers (:mod:`jft.models.bert`, :mod:`jft.models.vit`).

Multi-head self-attention with separate query/key/value/output ``Dense``
layers, the padding mask as an additive bias, and the stack of blocks that both
models keep under ``backbone/encoder/layer_{i}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models import layers

__all__ = ["Encoder", "EncoderBlock", "SelfAttention", "attention_bias"]

Dtype = Any


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """``(B, T)`` 1/0 mask -> ``(B, 1, 1, T)`` float32 additive bias: 0 to keep, a large negative.

    Always float32, also when the model computes in bf16: the attention logits are
    cast to float32 before the bias is added, so the softmax sees exact zeros for
    padding and the unmasked logits keep their float32 value.
    """
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output ``Dense`` layers.

    Shared by BERT and ViT. The softmax runs in float32 whatever ``dtype`` is.
    """

    num_heads: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None, *, train: bool) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``; ``bias`` is added to the ``(B, heads, T, T)`` logits."""
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"hidden size {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads

        def dense(name: str, use_bias: bool = self.use_bias) -> nn.Dense:
            return layers.dense(
                d, use_bias=use_bias, dtype=self.dtype, kernel_init=self.kernel_init, name=name
            )

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, self.num_heads, head_dim)

        q = heads(dense("query")(x))
        k = heads(dense("key")(x))
        v = heads(dense("value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        logits = logits.astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return dense("output", use_bias=True)(y)


class EncoderBlock(nn.Module):
    """What BERT's post-norm and ViT's pre-norm blocks share: fields, norm, dropout, attention.

    A block is built from its model's fields by name
    (:func:`jft.models.layers.fields_for`), so these have no defaults of their own.
    """

    num_heads: int
    hidden_act: str
    dropout_rate: float
    attention_dropout_rate: float
    layer_norm_eps: float
    dtype: Dtype

    @nn.nowrap
    def norm(self, name: str) -> nn.LayerNorm:
        """A LayerNorm named ``name``."""
        return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)

    @nn.nowrap
    def drop(self, y: jax.Array, train: bool) -> jax.Array:
        """``y`` through dropout at ``dropout_rate`` in train mode."""
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)

    @nn.nowrap
    def attention(self, use_bias: bool = True) -> SelfAttention:
        """The block's :class:`SelfAttention`, named ``attention``."""
        return SelfAttention(
            self.num_heads,
            self.attention_dropout_rate,
            use_bias=use_bias,
            dtype=self.dtype,
            name="attention",
        )


class Encoder(nn.Module):
    """``num_layers`` blocks applied in turn, named ``layer_{i}``.

    Attributes:
      layer: builds one block given its ``name`` (a ``functools.partial`` of the
        block class with its fields), called as ``block(x, *args, train=train)``.
      num_layers: how many blocks.
    """

    layer: Callable[..., nn.Module]
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any, train: bool) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``; ``args`` go to every block."""
        for i in range(self.num_layers):
            x = self.layer(name=f"layer_{i}")(x, *args, train=train)
        return x
