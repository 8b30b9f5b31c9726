"""GPT-2 (Radford et al., 2019), laid out as Hugging Face's ``GPT2LMHeadModel``.

Parameter paths (Hugging Face's ``Conv1D`` weights are ``(in, out)``, Flax's
kernel layout, so they load untransposed; q, k and v stay fused in ``c_attn``)::

    backbone/wte/embedding            backbone/wpe/embedding
    backbone/layers_{i}/ln_1/{scale,bias}
    backbone/layers_{i}/attn/c_attn/{kernel,bias}     (D, 3D): q, then k, then v
    backbone/layers_{i}/attn/c_proj/{kernel,bias}
    backbone/layers_{i}/ln_2/{scale,bias}
    backbone/layers_{i}/mlp/c_fc/{kernel,bias}
    backbone/layers_{i}/mlp/c_proj/{kernel,bias}
    backbone/ln_f/{scale,bias}
    lm_head/kernel                    (only with tie_word_embeddings=False)

Called as :class:`jft.models.llama.Llama` is: logits ``(B, T, vocab)`` float32, or
``(logits, new_cache)`` with ``cache=``; position ids default to ``cumsum(mask) - 1``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jft.models._decoder import (
    DecoderConfigError,
    DecoderTrunk,
    LanguageModel,
    attend,
    cached_kv,
    no_head,
    remat_block,
    slot_bias,
    slots_and_mask,
)
from jft.models.layers import activation, dense, fields_for
from jft.models.registry import register

__all__ = ["GPT2", "GPT2Attention", "GPT2Backbone", "GPT2Block", "gpt2"]

Dtype = Any


def _dense(n: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    init = nn.initializers.normal(0.02)
    return dense(n, dtype=dtype, param_dtype=param_dtype, kernel_init=init, name=name)


class GPT2Attention(nn.Module):
    """Causal self-attention with fused ``c_attn`` (q, k, v) and a KV cache."""

    num_heads: int
    attn_dropout: float = 0.0
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, cache, cache_index):
        """``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""
        b, t, d = x.shape
        hd = d // self.num_heads
        qkv = _dense(3 * d, self.dtype, self.param_dtype, "c_attn")(x)
        q, k, v = (y.reshape(b, t, self.num_heads, hd) for y in jnp.split(qkv, 3, axis=-1))
        k, v, new_cache = cached_kv(cache, k, v, cache_index)
        y = attend(q, k, v, bias, hd**-0.5)
        y = nn.Dropout(self.attn_dropout, deterministic=not self.train)(y)
        return _dense(d, self.dtype, self.param_dtype, "c_proj")(y), new_cache


class GPT2Block(GPT2Attention):
    """One pre-LayerNorm GPT-2 block: attention and a GELU MLP (``c_fc``, ``c_proj``).

    It has :class:`GPT2Attention`'s fields, which it passes on, and the MLP's.
    """

    intermediate_size: int = 3072
    activation_function: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    resid_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, bias, cache, cache_index):  # type: ignore[override]
        """``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""
        d = x.shape[-1]

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(
                self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )

        drop = nn.Dropout(self.resid_dropout, deterministic=not self.train)
        y, new_cache = GPT2Attention(**fields_for(GPT2Attention, self), name="attn")(
            norm("ln_1")(x), bias, cache, cache_index
        )
        x = x + drop(y)
        y = _GPT2Mlp(
            d,
            self.intermediate_size,
            self.activation_function,
            self.dtype,
            self.param_dtype,
            name="mlp",
        )(norm("ln_2")(x))
        return x + drop(y), new_cache


class _GPT2Mlp(nn.Module):
    features: int
    intermediate_size: int
    activation_function: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        h = _dense(self.intermediate_size, self.dtype, self.param_dtype, "c_fc")(x)
        h = activation(self.activation_function)(h)
        return _dense(self.features, self.dtype, self.param_dtype, "c_proj")(h)


class GPT2Backbone(DecoderTrunk):
    """Token and position embeddings, blocks ``layers_{i}`` and ``ln_f``; HF config fields.

    Attributes:
      intermediate_size: None: ``4 * hidden_size`` (HF's ``n_inner``).
      remat: per-block rematerialization policy (see :class:`jft.models.llama.Llama`).
      dtype: compute dtype; ``param_dtype``: parameter dtype.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    embd_dropout: float = 0.1
    resid_dropout: float = 0.1
    attn_dropout: float = 0.1
    tie_word_embeddings: bool = True
    remat: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def cache_spec(self) -> tuple[int, int, int]:
        """``(num_layers, kv_heads, head_dim)`` of this model's KV cache."""
        return self.num_layers, self.num_heads, self.hidden_size // self.num_heads

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, cache_index, train):
        """See :class:`GPT2`; returns ``(hidden, new cache or None, wte matrix)``."""
        if self.hidden_size % self.num_heads:
            raise DecoderConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        q_slots, kv_mask, position_ids = slots_and_mask(
            input_ids, attention_mask, position_ids, cache, cache_index
        )
        bias = slot_bias(kv_mask, q_slots)

        def embed(n: int, name: str) -> nn.Embed:
            return nn.Embed(
                n,
                self.hidden_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                embedding_init=nn.initializers.normal(0.02),
                name=name,
            )

        wte = embed(self.vocab_size, "wte")
        x = wte(input_ids) + embed(self.n_positions, "wpe")(position_ids)
        x = nn.Dropout(self.embd_dropout, deterministic=not train)(x)
        block = remat_block(GPT2Block, self.remat)
        inner = self.intermediate_size or 4 * self.hidden_size
        fields = fields_for(GPT2Block, self, intermediate_size=inner, train=train)
        new_cache = []
        for i in range(self.num_layers):
            x, layer_cache = block(**fields, name=f"layers_{i}")(
                x, bias, None if cache is None else cache[i], cache_index
            )
            new_cache.append(layer_cache)
        x = nn.LayerNorm(
            self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f"
        )(x)
        return x, (None if cache is None else tuple(new_cache)), wte.embedding


class GPT2(LanguageModel, GPT2Backbone):
    """GPT-2 with its LM head (tied to ``wte`` by default).

    Call ``model.apply(variables, input_ids, attention_mask=None, position_ids=None)``
    for logits ``(B, T, vocab)`` float32; with ``cache=`` (:meth:`init_cache`) and
    ``cache_index=`` it returns ``(logits, new_cache)``. ``train=True`` turns on
    dropout (rng ``"dropout"``).
    """

    backbone_class = GPT2Backbone


@register("gpt2")
def gpt2(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> GPT2:
    """GPT-2; ``kwargs`` are :class:`GPT2` fields (defaults: GPT-2 small, 124M)."""
    no_head(num_classes)
    return GPT2(dtype=dtype, **kwargs)
